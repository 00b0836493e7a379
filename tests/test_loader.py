"""Loader: both expert layouts, shards, dtypes, and a CheckpointError naming the problem for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybrimoe.config import ModelConfig
from hybrimoe.errors import CheckpointError, ConfigError
from hybrimoe.loader import build_dummy_model, load_model

Tensors = dict[str, torch.Tensor]


def rewrite(src: Path, dst: Path, edit: Callable[[Tensors], None]) -> Path:
    """Copies a single-file checkpoint to `dst`, letting `edit` change its tensors."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def logits(model, n: int = 8) -> torch.Tensor:
    ids = torch.arange(3, 3 + n)
    return model(ids, 0, model.new_kv_cache(n))


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mixtral")


def test_store_rows_hold_checkpoint_experts_in_gate_up_down_order(mixtral) -> None:
    model = load_model(mixtral, progress=False)
    tensors = load_file(mixtral / "model.safetensors")
    store = model.expert_store
    prefix = "model.layers.1.block_sparse_moe.experts.5"
    buf = store.buffer(1, 5)
    assert buf.dim() == 1 and buf.is_contiguous()
    want = torch.cat([tensors[f"{prefix}.{w}.weight"].flatten() for w in ("w1", "w3", "w2")])
    assert torch.equal(buf, want)
    w = store.weights(1, 5)
    assert torch.equal(w.down, tensors[f"{prefix}.w2.weight"])
    assert w.gate.data_ptr() == buf.data_ptr()                               # views, not copies
    assert store.buffer(1, 6).data_ptr() == buf.data_ptr() + store.expert_nbytes   # one tensor per layer
    assert store.expert_nbytes == model.config.expert_bytes(4)


def test_fused_and_per_expert_layouts_fill_identical_stores(tiny_checkpoint) -> None:
    a = load_model(tiny_checkpoint("qwen3-moe"), progress=False).expert_store
    b = load_model(tiny_checkpoint("qwen3-moe", "fused"), progress=False).expert_store
    for layer in a.layers:
        assert torch.equal(a.layer_tensor(layer), b.layer_tensor(layer))


def test_sharded_checkpoint_loads(tiny_checkpoint, mixtral) -> None:
    sharded = tiny_checkpoint("mixtral", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert torch.equal(logits(load_model(sharded, progress=False)), logits(load_model(mixtral, progress=False)))


@pytest.mark.parametrize("family,dtype,torch_dtype",
                         [("mixtral", "bf16", torch.bfloat16), ("deepseek-v2", "fp16", torch.float16)])
def test_half_precision_loads(tiny_checkpoint, family: str, dtype: str, torch_dtype: torch.dtype) -> None:
    path = tiny_checkpoint(family)
    half = load_model(path, dtype=dtype, progress=False)
    assert half.dtype == torch_dtype and half.expert_store.dtype == torch_dtype
    layer = half.config.moe_layers[0]
    assert half.moe_blocks[layer].gate.weight.dtype == torch.float32       # router stays fp32
    full = load_model(path, progress=False)
    rows = full.expert_store.layer_tensor(layer).to(torch_dtype)
    assert torch.equal(half.expert_store.layer_tensor(layer), rows)
    want, got = logits(full), logits(half)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # half-precision rounding only (a near-tie between two experts could flip a route; these seeds have none)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_bf16_keeps_deepseek_v3_router_and_bias_in_fp32(tiny_checkpoint) -> None:
    model = load_model(tiny_checkpoint("deepseek-v3"), dtype="bf16", progress=False)
    gate = model.moe_blocks[1].gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert gate.e_score_correction_bias.abs().sum() > 0
    assert torch.isfinite(logits(model)).all()


def test_unknown_dtype_is_a_config_error(mixtral) -> None:
    with pytest.raises(ConfigError, match="int3"):
        load_model(mixtral, dtype="int3")


def test_missing_dense_tensor(mixtral, tmp_path) -> None:
    path = rewrite(mixtral, tmp_path / "m", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, progress=False)


def test_missing_expert_tensor(mixtral, tmp_path) -> None:
    name = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    path = rewrite(mixtral, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.mlp\.experts\.3\.up_proj"):
        load_model(path, progress=False)


def test_missing_fused_expert_tensor_is_named(tiny_checkpoint, tmp_path) -> None:
    path = rewrite(tiny_checkpoint("olmoe", "fused"), tmp_path / "m",
                   lambda t: t.pop("model.layers.1.mlp.experts.down_proj"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.experts\.down_proj\b"):
        load_model(path, progress=False)


def test_unexpected_tensor(mixtral, tmp_path) -> None:
    def add(t: Tensors) -> None:
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(4)
    with pytest.raises(CheckpointError, match=r"unexpected.*q_norm\.weight.*model\.safetensors"):
        load_model(rewrite(mixtral, tmp_path / "m", add), progress=False)


def test_unexpected_expert_index(mixtral, tmp_path) -> None:
    def add(t: Tensors) -> None:
        prefix = "model.layers.0.block_sparse_moe.experts"
        t[f"{prefix}.8.w1.weight"] = t[f"{prefix}.0.w1.weight"].clone()
    with pytest.raises(CheckpointError, match=r"unexpected.*experts\.8\.w1"):
        load_model(rewrite(mixtral, tmp_path / "m", add), progress=False)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.block_sparse_moe.experts.2.w2.weight"])
def test_misshaped_tensor(mixtral, tmp_path, name: str) -> None:
    def shrink(t: Tensors) -> None:
        t[name] = t[name][..., :-1].contiguous()
    with pytest.raises(CheckpointError, match=rf"misshaped.*{name.replace('.', r'.')}.*expected"):
        load_model(rewrite(mixtral, tmp_path / "m", shrink), progress=False)


def test_misshaped_fused_tensor(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("olmoe", "fused")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    path = rewrite(src, tmp_path / "m", lambda t: t.update({name: t[name][:, :-2].contiguous()}))
    with pytest.raises(CheckpointError, match=r"misshaped.*gate_up_proj.*expected \(8, 64, 64\)"):
        load_model(path, progress=False)


def test_missing_config_json(mixtral, tmp_path) -> None:
    shutil.copytree(mixtral, tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "m")


def test_no_safetensors(mixtral, tmp_path) -> None:
    shutil.copytree(mixtral, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_model(tmp_path / "m")


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path) -> None:
    shutil.copytree(tiny_checkpoint("mixtral", max_shard_size="40KB"), tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shard}'.*missing"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("weight_map", [["model.norm.weight"], {"model.norm.weight": 3}])
def test_malformed_index_is_a_checkpoint_error(tiny_checkpoint, tmp_path, weight_map) -> None:
    shutil.copytree(tiny_checkpoint("mixtral", max_shard_size="40KB"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.0.block_sparse_moe.experts.1.w3.weight"])
def test_integer_tensor_is_refused(mixtral, tmp_path, name: str) -> None:
    path = rewrite(mixtral, tmp_path / "m", lambda t: t.update({name: t[name].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', r'.')}.*int32"):
        load_model(path, progress=False)


def test_a_tensor_in_two_files_is_a_duplicate(tiny_checkpoint, tmp_path) -> None:
    shutil.copytree(tiny_checkpoint("mixtral", max_shard_size="40KB"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").unlink()   # load every *.safetensors in the folder
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    shutil.copy(shard, tmp_path / "m" / "zz-stale-copy.safetensors")
    with pytest.raises(CheckpointError, match=r"duplicate tensor .* in zz-stale-copy\.safetensors"):
        load_model(tmp_path / "m", progress=False)


def test_model_safetensors_wins_over_stray_files(mixtral, tmp_path) -> None:
    shutil.copytree(mixtral, tmp_path / "m")
    save_file({"output.weight": torch.ones(2)}, tmp_path / "m" / "consolidated.safetensors")
    assert torch.equal(logits(load_model(tmp_path / "m", progress=False)), logits(load_model(mixtral, progress=False)))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(mixtral, tmp_path, damage: str) -> None:
    shutil.copytree(mixtral, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 4)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated.*model\.safetensors"):
        load_model(tmp_path / "m")


def test_deepseek_v3_next_token_prediction_layers_are_ignored(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("deepseek-v3")
    n = ModelConfig.from_pretrained(src).num_layers
    extra = {f"model.layers.{n}.eh_proj.weight": torch.ones(2, 2)}    # an MTP layer's tensor
    path = rewrite(src, tmp_path / "m", lambda t: t.update(extra))
    assert torch.equal(logits(load_model(path, progress=False)), logits(load_model(src, progress=False)))


def test_dummy_model_is_seeded_and_finite(tiny_checkpoint) -> None:
    config = ModelConfig.from_pretrained(tiny_checkpoint("deepseek-v2"))
    a, b = build_dummy_model(config, "fp32", seed=3), build_dummy_model(config, "fp32", seed=3)
    out = logits(a)
    assert torch.isfinite(out).all() and out.std() > 0
    assert torch.equal(out, logits(b))
    assert not torch.equal(out, logits(build_dummy_model(config, "fp32", seed=4)))


def test_make_tiny_cli_writes_a_loadable_checkpoint(tmp_path, capsys) -> None:
    from hybrimoe.cli import main

    out = tmp_path / "tiny"
    assert main(["make-tiny", "--family", "olmoe", "--out", str(out), "--layout", "fused", "--experts", "4",
                 "--top-k", "1", "--layers", "2", "--hidden", "32", "--seed", "7"]) == 0
    model = load_model(out, progress=False)
    assert (model.config.num_experts, model.config.top_k, model.config.num_layers) == (4, 1, 2)
    assert torch.isfinite(logits(model)).all()
    assert main(["make-tiny", "--family", "olmoe", "--out", str(tmp_path / "x"), "--hidden", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_experts_larger_than_host_memory_are_refused_before_allocation(tiny_checkpoint, monkeypatch) -> None:
    from hybrimoe.errors import BudgetError
    from hybrimoe.moe import store

    monkeypatch.setattr(store, "host_available_bytes", lambda: 1000)  # 1 kB of RAM left
    with pytest.raises(BudgetError, match=r"routed experts .* host memory"):
        load_model(tiny_checkpoint("mixtral"))
