"""Bad GGUF input is a CheckpointError / ConfigError naming the problem; metadata -> config semantics."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest

from gguf_fixtures import tiny_gguf  # noqa: F401  (fixture)
from hybrimoe.config import ModelConfig
from hybrimoe.errors import CheckpointError, ConfigError
from hybrimoe.gguf.metadata import hf_config_from_gguf
from hybrimoe.loader import load_model


def test_a_missing_split_part_is_named(tiny_gguf, tmp_path: Path) -> None:
    t = tiny_gguf("mixtral", split_max_tensors=7)
    for f in t.files:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / t.files[1].name).unlink()
    with pytest.raises(CheckpointError, match=f"missing: {t.files[1].name}"):
        load_model(tmp_path / t.files[0].name, progress=False)


def test_a_truncated_file_is_refused(tiny_gguf, tmp_path: Path) -> None:
    t = tiny_gguf("qwen3-moe")
    short = tmp_path / "short.gguf"
    data = t.path.read_bytes()
    short.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated GGUF file .*short.gguf"):
        load_model(short, progress=False)
    short.write_bytes(data[:100])            # cut inside the metadata
    with pytest.raises(CheckpointError, match="truncated GGUF file"):
        ModelConfig.from_pretrained(short)
    short.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(short, progress=False)


def test_a_missing_tensor_is_named(tiny_gguf) -> None:
    t = tiny_gguf("deepseek-v3", drop=("blk.2.ffn_down_exps.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) in .*blk\.2\.ffn_down_exps\.weight"):
        load_model(t.path, progress=False)


def test_an_unsupported_tensor_type_is_named(tiny_gguf) -> None:
    t = tiny_gguf("olmoe", force={"blk.1.attn_v.weight": "MXFP4"})
    with pytest.raises(CheckpointError, match="'blk.1.attn_v.weight' has type MXFP4; supported: F32, F16, BF16"):
        load_model(t.path, progress=False)


def _minimal(path: Path, arch: str, **kv: int) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture_and_dense_llama_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gemma2'; supported: llama, qwen2moe"):
        load_model(_minimal(tmp_path / "g.gguf", "gemma2"), progress=False)
    dense = _minimal(tmp_path / "l.gguf", "llama", block_count=2, embedding_length=64,
                     **{"attention.head_count": 4})
    with pytest.raises(ConfigError, match="without experts"):
        ModelConfig.from_pretrained(dense)


def test_a_directory_with_two_models_asks_for_the_file(tiny_gguf, tmp_path: Path) -> None:
    shutil.copy(tiny_gguf("mixtral").path, tmp_path / "a.gguf")
    shutil.copy(tiny_gguf("mixtral").path, tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"several GGUF models \(a.gguf, b.gguf\)"):
        load_model(tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "c.gguf", progress=False)


# ------------------------------------------------------------------ metadata semantics (docs/GGUF.md)
def _meta(arch: str, **extra) -> dict:
    base = {"general.architecture": arch, f"{arch}.block_count": 2, f"{arch}.embedding_length": 64,
            f"{arch}.attention.head_count": 4, f"{arch}.expert_count": 8, f"{arch}.expert_used_count": 2,
            f"{arch}.context_length": 256, f"{arch}.feed_forward_length": 128, f"{arch}.vocab_size": 100,
            f"{arch}.expert_feed_forward_length": 32}
    return base | {f"{arch}.{k}": v for k, v in extra.items()}


MOE_TENSORS = {"blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight", "output.weight"}


@pytest.mark.parametrize("arch,default", [("qwen2moe", False), ("qwen3moe", True), ("olmoe", False)])
def test_top_k_renormalisation_follows_the_file_else_the_family(arch: str, default: bool) -> None:
    cfg = ModelConfig.from_dict(hf_config_from_gguf(_meta(arch), MOE_TENSORS))
    assert cfg.norm_topk_prob is default
    said = ModelConfig.from_dict(hf_config_from_gguf(_meta(arch, expert_weights_norm=not default), MOE_TENSORS))
    assert said.norm_topk_prob is (not default)


def _deepseek(**extra) -> dict:
    return _meta("deepseek2", **{"attention.kv_lora_rank": 16, "attention.key_length_mla": 24,
                                 "attention.value_length_mla": 16, "rope.dimension_count": 8, **extra})


def test_deepseek_router_kind_comes_from_gating_func_and_groups() -> None:
    v2 = ModelConfig.from_dict(hf_config_from_gguf(_deepseek(expert_group_count=4, expert_group_used_count=2),
                                                   MOE_TENSORS))
    assert (v2.model_type, v2.topk_method, v2.scoring_func, v2.n_group) == (
        "deepseek_v2", "group_limited_greedy", "softmax", 4)
    lite = ModelConfig.from_dict(hf_config_from_gguf(_deepseek(), MOE_TENSORS))
    assert lite.topk_method == "greedy" and lite.routed_scaling_factor == 1.0 and not lite.norm_topk_prob
    v3 = ModelConfig.from_dict(hf_config_from_gguf(
        _deepseek(expert_gating_func=2, expert_group_count=4, expert_group_used_count=2,
                  expert_weights_norm=True, expert_weights_scale=2.5), MOE_TENSORS))
    assert (v3.model_type, v3.topk_method, v3.scoring_func, v3.norm_topk_prob, v3.routed_scaling_factor) == (
        "deepseek_v3", "noaux_tc", "sigmoid", True, 2.5)
    assert v3.qk_nope_head_dim == 16 and v3.v_head_dim == 16 and v3.num_kv_heads == 4


def test_moe_layers_qkv_bias_tie_window_clamp_and_eos_come_from_the_file() -> None:
    meta = _meta("qwen2moe") | {"tokenizer.ggml.tokens": ["a", "<|im_end|>", "b"], "tokenizer.ggml.eos_token_id": 2}
    cfg = ModelConfig.from_dict(hf_config_from_gguf(meta, {"blk.1.ffn_gate_inp.weight", "blk.0.attn_q.bias"}))
    assert cfg.moe_layers == (1,) and cfg.qkv_bias and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2, 1)        # eos, then llama.cpp's end-of-generation texts
    mixtral = ModelConfig.from_dict(hf_config_from_gguf(_meta("llama", **{"attention.sliding_window": 32}),
                                                        MOE_TENSORS))
    assert mixtral.model_type == "mixtral" and mixtral.sliding_window == 32 and mixtral.moe_intermediate_size == 128
    olmoe = ModelConfig.from_dict(hf_config_from_gguf(_meta("olmoe", **{"attention.clamp_kqv": 8.0}), MOE_TENSORS))
    assert olmoe.clip_qkv == 8.0 and not olmoe.qkv_bias
