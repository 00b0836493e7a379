"""Test-side HF -> GGUF converter that follows llama.cpp's `convert_hf_to_gguf.py` conventions.

What it copies from llama.cpp (conversion/base.py `TextModel.set_gguf_parameters`, `prepare_tensors`,
`filter_tensors`, `_set_vocab_gpt2`; conversion/llama.py `LlamaModel` (q/k permutation, Mixtral expert
stacking); conversion/qwen.py `Qwen2MoeModel`/`Qwen3MoeModel`; conversion/olmo.py `OlmoeModel`;
conversion/deepseek.py `DeepseekV2Model` (kv_b split into k_b (transposed) / v_b, MQA head_count_kv 1,
expert metadata)): metadata keys, tensor names (through gguf-py's own `TensorNameMap`), the tensor
type rules (1-D, *_norm and router weights stay F32; a row that does not fit the block size falls
back to F16), split files through `GGUFWriter(split_max_tensors=...)`.
Differences: the tiny tokenizer's pre-tokenizer is written as "gpt-2" (llama.cpp identifies it by a
hash of known tokenizers, which a tiny one cannot match); Q4_K, which gguf-py cannot quantise, goes
through `gguf_quants.quantize_q4_k` (a plain min/max quantiser, not llama.cpp's search, same format).

`write_gguf` also returns, for every original tensor name, the float32 values a reader must recover
(dequantised, un-permuted, un-stacked), so tests can build a plain fp32 reference with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from safetensors import safe_open

from gguf_quants import quantize, random_blocks

ARCH = {"MixtralForCausalLM": gguf.MODEL_ARCH.LLAMA, "Qwen2MoeForCausalLM": gguf.MODEL_ARCH.QWEN2MOE,
        "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE, "OlmoeForCausalLM": gguf.MODEL_ARCH.OLMOE,
        "DeepseekV2ForCausalLM": gguf.MODEL_ARCH.DEEPSEEK2, "DeepseekV3ForCausalLM": gguf.MODEL_ARCH.DEEPSEEK2}
FTYPE = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
         "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
         "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M}
F32_KINDS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)
Q = gguf.GGMLQuantizationType
Undo = Callable[[np.ndarray], list[tuple[str, np.ndarray]]]   # stored values -> original (name, values)


# ---------------------------------------------------------------------------------------- model side
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """conversion/llama.py LlamaModel.permute (for k, n_head = n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Converter:
    def __init__(self, model_dir: Path, overrides: dict[str, Any] | None = None) -> None:
        self.dir = model_dir
        self.hp = json.loads((model_dir / "config.json").read_text()) | dict(overrides or {})
        self.hf_arch = self.hp["architectures"][0]
        self.arch = ARCH[self.hf_arch]
        self.n_layers = self.hp["num_hidden_layers"]
        self.tmap = gguf.get_tensor_name_map(self.arch, self.n_layers)
        self.experts: dict[int, dict[str, np.ndarray]] = {}
        self.split_kv_b = True
        self.fuse_gate_up = False

    def find(self, keys: list[str]) -> Any:
        return next((self.hp[k] for k in keys if self.hp.get(k) is not None), None)

    def metadata(self, w: gguf.GGUFWriter, ftype: gguf.LlamaFileType) -> None:
        hp, deepseek = self.hp, self.arch == gguf.MODEL_ARCH.DEEPSEEK2
        if deepseek:
            hp = self.hp = hp | {"num_key_value_heads": 1}       # "deepseek2 using MLA converts into MQA"
        w.add_name(self.dir.name)
        w.add_block_count(self.n_layers)
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(hp["hidden_size"])
        w.add_feed_forward_length(self.find(["intermediate_size"]))
        w.add_head_count(hp["num_attention_heads"])
        w.add_head_count_kv(hp["num_key_value_heads"])
        rope = hp.get("rope_parameters") or {}
        if rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if rope.get("beta_fast") is not None:
                w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
            if rope.get("beta_slow") is not None:
                w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(rope["rope_theta"])
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_expert_count(self.find(["num_local_experts", "num_experts", "n_routed_experts"]))
        w.add_expert_used_count(hp["num_experts_per_tok"])
        if hp.get("n_group") is not None:
            w.add_expert_group_count(hp["n_group"])
        if hp.get("topk_group") is not None:
            w.add_expert_group_used_count(hp["topk_group"])
        if (func := hp.get("scoring_func")) is not None:
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if func == "sigmoid"
                                     else gguf.ExpertGatingFuncType.SOFTMAX)
        if hp.get("head_dim") is not None:
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        w.add_file_type(ftype)
        if self.arch == gguf.MODEL_ARCH.LLAMA:
            w.add_vocab_size(hp["vocab_size"])
            w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
        elif self.arch in (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN3MOE):
            w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
            if hp.get("shared_expert_intermediate_size") is not None:
                w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
        elif self.arch == gguf.MODEL_ARCH.OLMOE:
            w.add_layer_norm_rms_eps(1e-5)
        else:
            w.add_leading_dense_block_count(hp.get("first_k_dense_replace") or 0)
            w.add_vocab_size(hp["vocab_size"])
            if hp.get("q_lora_rank") is not None:
                w.add_q_lora_rank(hp["q_lora_rank"])
            w.add_kv_lora_rank(hp["kv_lora_rank"])
            w.add_key_length(hp["kv_lora_rank"] + hp["qk_rope_head_dim"])
            w.add_value_length(hp["kv_lora_rank"])
            w.add_key_length_mla(hp["qk_nope_head_dim"] + hp["qk_rope_head_dim"])
            w.add_value_length_mla(hp["v_head_dim"])
            w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
            w.add_expert_shared_count(hp.get("n_shared_experts", 0))
            if hp.get("routed_scaling_factor") is not None:
                w.add_expert_weights_scale(hp["routed_scaling_factor"])
            if hp.get("norm_topk_prob"):
                w.add_expert_weights_norm(True)
            w.add_rope_dimension_count(hp["qk_rope_head_dim"])
            if rope.get("mscale_all_dim") is not None:
                w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])

    def vocab(self, w: gguf.GGUFWriter) -> None:
        """conversion/base.py _set_vocab_gpt2 / get_vocab_base."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.dir)
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
        tokens, types = [], []
        for i in range(self.hp["vocab_size"]):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(added[i])
                special = tok.added_tokens_decoder[i].special or added[i].startswith("<|")
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        gguf.SpecialVocab(self.dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        files = sorted(self.dir.glob("*.safetensors"))
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    name2 = name.replace("e_score_correction_bias", "e_score_correction.bias")  # filter_tensors
                    yield name2, f.get_tensor(name).float().numpy()

    def modify(self, name: str, data: np.ndarray) -> Iterator[tuple[str, np.ndarray, Undo]]:
        """(gguf-py source name, data, undo) per output tensor: the family's modify_tensors."""
        hp = self.hp
        orig = name.replace("e_score_correction.bias", "e_score_correction_bias")
        same: Undo = lambda v, n=orig: [(n, v)]   # noqa: E731
        bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
        if self.arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hp["num_attention_heads"] if "q_proj" in name else hp["num_key_value_heads"]
            yield name, permute(data, heads), lambda v, n=orig, h=heads: [(n, unpermute(v, h))]
            return
        if ".experts." in name:
            n_exp = self.find(["num_local_experts", "num_experts", "n_routed_experts"])
            got = self.experts.setdefault(bid, {})
            got[name] = data
            if len(got) < 3 * n_exp:
                return
            llama = self.arch == gguf.MODEL_ARCH.LLAMA
            for wid in (("w1", "w2", "w3") if llama else ("down_proj", "gate_proj", "up_proj")):
                block = "block_sparse_moe" if llama else "mlp"
                names = [f"model.layers.{bid}.{block}.experts.{x}.{wid}.weight" for x in range(n_exp)]
                stacked = np.stack([got.pop(n) for n in names])
                merged = (f"layers.{bid}.feed_forward.experts.{wid}.weight" if llama
                          else f"model.layers.{bid}.mlp.experts.{wid}.weight")
                yield merged, stacked, lambda v, ns=names: list(zip(ns, v))
            return
        if name.endswith("kv_b_proj.weight") and self.split_kv_b:
            n, v_dim, nope = hp["num_attention_heads"], hp["v_head_dim"], hp["qk_nope_head_dim"]
            kv_b = data.reshape(n, nope + v_dim, data.shape[-1])
            k_b, v_b = kv_b[:, :nope], kv_b[:, nope:]
            parts: dict[str, np.ndarray] = {}

            def undo(v: np.ndarray, key: str) -> list[tuple[str, np.ndarray]]:
                parts[key] = v
                if len(parts) < 2:
                    return []
                full = np.concatenate([parts["k"].swapaxes(1, 2), parts["v"]], axis=1)
                return [(orig, full.reshape(-1, full.shape[-1]))]

            yield name.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(k_b.swapaxes(1, 2)), \
                lambda v: undo(v, "k")
            yield name.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(v_b), lambda v: undo(v, "v")
            return
        yield name, data, same

    def fused(self, mapped: Iterator[tuple[str, np.ndarray, Undo]]) -> Iterator[tuple[str, np.ndarray, Undo]]:
        """base.py modify_tensors with fuse_gate_up_exps: gate and up experts -> ffn_gate_up_exps [E, 2I, H]."""
        held: dict[tuple[int, str], tuple[np.ndarray, Undo]] = {}
        for new, out, undo in mapped:
            kind = next((k for k in ("gate", "up") if new.endswith(f".ffn_{k}_exps.weight")), None)
            if not self.fuse_gate_up or kind is None:
                yield new, out, undo
                continue
            bid = int(new.split(".")[1])
            held[bid, kind] = (out, undo)
            if (bid, "gate") in held and (bid, "up") in held:
                (gate, undo_g), (up, undo_u) = held.pop((bid, "gate")), held.pop((bid, "up"))
                i = gate.shape[1]
                yield (f"blk.{bid}.ffn_gate_up_exps.weight", np.concatenate([gate, up], axis=1),
                       lambda v, g=undo_g, u=undo_u, i=i: g(v[:, :i]) + u(v[:, i:]))

    def mapped(self) -> Iterator[tuple[str, np.ndarray, Undo]]:
        tied = self.hp.get("tie_word_embeddings", False)
        for name, data in self.hf_tensors():
            if tied and name == "lm_head.weight":
                continue
            for src, out, undo in self.modify(name, data):
                new = self.tmap.get_name(src, try_suffixes=(".weight", ".bias"))
                assert new is not None, f"llama.cpp cannot map {src!r} for {self.arch.name}"
                yield new, out, undo

    def tensors(self, qtype: Q) -> Iterator[tuple[str, np.ndarray, Q, Undo]]:
        for new, out, undo in self.fused(self.mapped()):
            bid = next((int(p) for p in new.split(".") if p.isdecimal()), None)
            keep = out.ndim <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight") or any(
                new == gguf.TENSOR_NAMES[k].format(bid=bid) + ".weight" for k in F32_KINDS)
            stored, kind = quantize(out, Q.F32 if keep else qtype)
            yield new, stored, kind, undo


def write_gguf(model_dir: str | Path, out: str | Path, qtype: str = "F32", split_max_tensors: int = 0,
               overrides: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
               force: dict[str, str] | None = None,
               split_kv_b: bool = True, fuse_gate_up: bool = False) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """Converts a tiny HF checkpoint; returns (written files, {original name: values a reader must get}).

    overrides: config.json values to convert with (e.g. a field the tiny config lacks but real configs
    have); drop: GGUF tensor names to leave out (for error tests); force: {GGUF name: type} stores that
    tensor in that type (Q5_K / Q6_K as random blocks); split_kv_b=False writes DeepSeek's kv_b whole,
    as converters before llama.cpp's MLA split did; fuse_gate_up writes ffn_gate_up_exps (the
    converter's fuse_gate_up_exps option).
    """
    conv = Converter(Path(model_dir), overrides)
    conv.split_kv_b, conv.fuse_gate_up = split_kv_b, fuse_gate_up
    ftype = FTYPE[qtype]
    w = gguf.GGUFWriter(Path(out), gguf.MODEL_ARCH_NAMES[conv.arch], split_max_tensors=split_max_tensors)
    conv.metadata(w, ftype)
    conv.vocab(w)
    expected: dict[str, torch.Tensor] = {}
    target = Q[qtype]
    for name, stored, kind, undo in conv.tensors(target):
        if name in drop:
            continue
        if name in (force or {}):
            shape = tuple(gguf.quant_shape_from_byte_shape(stored.shape, kind)) if stored.dtype == np.uint8 \
                else stored.shape
            kind = Q[force[name]]
            floats = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.15
            stored = (random_blocks(shape, kind) if kind in (Q.Q5_K, Q.Q6_K)
                      else gguf.quants.quantize(floats, kind))
        w.add_tensor(name, stored, raw_dtype=kind)
        values = gguf.quants.dequantize(stored, kind)
        for orig, v in undo(values):
            expected[orig] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    assert not any(conv.experts.values()), "unprocessed experts"
    files = w.format_shard_names(Path(out))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return files, expected
