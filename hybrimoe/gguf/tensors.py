"""llama.cpp tensor names and layouts -> our (Hugging Face) parameter names, dequantised to float32.

Names are gguf-py's `TENSOR_NAMES` (gguf-py/gguf/constants.py; llama.cpp src/llama-arch.cpp
`LLM_TENSOR_NAMES`), as `convert_hf_to_gguf.py` maps them (gguf-py/gguf/tensor_mapping.py). Layouts:
- numpy order is the reverse of ggml's `ne`: a GGUF [ne0=H, ne1=I] tensor is our [I, H] weight.
- routed experts are stacked per layer: `blk.N.ffn_{gate,up}_exps` [E, I, H], `ffn_down_exps` [E, H, I]
  (or `ffn_gate_up_exps` [E, 2I, H] when converted with gate/up fusion); we slice them per expert.
- llama-arch files (Mixtral): the converter permutes q/k rows for ggml's rotary pairing
  (`LlamaModel.permute` in conversion/llama.py: per head, rows (i, i + D/2) become (2i, 2i + 1));
  `_unpermute` undoes it.
- DeepSeek: recent converters split `kv_b_proj` [N*(D+V), L] into `attn_k_b` [N, L, D] (transposed)
  and `attn_v_b` [N, V, L] (`DeepseekV2Model.modify_tensors` in conversion/deepseek.py); older files
  keep `attn_kv_b`. Either is accepted.
Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, dequantised by `gguf.quants.dequantize`
(exact: the fp32 value of every stored weight); others are a CheckpointError naming the tensor.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch

from hybrimoe.config import ModelConfig
from hybrimoe.errors import CheckpointError

# Q4_1 / Q5_0 / Q5_1 too: llama-quantize falls back to them where a row is not a multiple of 256
# (e.g. DeepSeek-V2-Lite's 1408-wide experts in a Q4_K_M file)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {   # GGUF name within blk.N -> our module path within model.layers.N
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_SHARED = {"ffn_gate_shexp": "gate_proj", "ffn_up_shexp": "up_proj", "ffn_down_shexp": "down_proj"}
_EXPERTS = {"ffn_gate_exps": ("gate_proj",), "ffn_up_exps": ("up_proj",), "ffn_down_exps": ("down_proj",),
            "ffn_gate_up_exps": ("gate_proj", "up_proj")}
_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def dequantize(tensor: Any, data: np.ndarray | None = None) -> torch.Tensor:
    """float32 torch tensor of a gguf ReaderTensor (or of `data`, a slice of its raw rows)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise CheckpointError(f"GGUF tensor {tensor.name!r} has type {qtype.name}; "
                              f"supported: {', '.join(SUPPORTED_TYPES)}")
    values = np.ascontiguousarray(gguf_dequantize(tensor.data if data is None else data, qtype), dtype=np.float32)
    if not values.flags.writeable:     # F32 comes back as a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(values)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: rows [heads * D] (or a bias [heads * D])."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _shared_prefix(config: ModelConfig) -> str:
    return "mlp.shared_expert" if config.shared_expert_gated else "mlp.shared_experts"


def expected_names(config: ModelConfig, names: set[str]) -> list[str]:
    """GGUF tensor names this config needs (one of the two DeepSeek kv_b layouts; fused or split experts)."""
    need = ["token_embd.weight", "output_norm.weight"] + ([] if config.tie_word_embeddings else ["output.weight"])
    for i in range(config.num_layers):
        b = f"blk.{i}."
        need += [b + "attn_norm.weight", b + "ffn_norm.weight", b + "attn_output.weight"]
        if config.attention == "mla":
            need += [b + n + ".weight" for n in ("attn_kv_a_mqa", "attn_kv_a_norm")]
            need += [b + n + ".weight" for n in (("attn_q_a", "attn_q_a_norm", "attn_q_b")
                                                 if config.q_lora_rank else ("attn_q",))]
            need += [b + "attn_kv_b.weight"] if b + "attn_kv_b.weight" in names else \
                [b + "attn_k_b.weight", b + "attn_v_b.weight"]
        else:
            need += [b + n + ".weight" for n in ("attn_q", "attn_k", "attn_v")]
            if config.qk_norm != "none":
                need += [b + "attn_q_norm.weight", b + "attn_k_norm.weight"]
        if i in config.moe_layers:
            need.append(b + "ffn_gate_inp.weight")
            need += [b + "ffn_gate_up_exps.weight"] if b + "ffn_gate_up_exps.weight" in names else \
                [b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight"]
            need.append(b + "ffn_down_exps.weight")
            if config.shared_expert_intermediate_size:
                need += [b + n + ".weight" for n in _SHARED]
            if config.shared_expert_gated:
                need.append(b + "ffn_gate_inp_shexp.weight")
            if config.topk_method == "noaux_tc":
                need.append(b + "exp_probs_b.bias")
        else:
            need += [b + n + ".weight" for n in ("ffn_gate", "ffn_up", "ffn_down")]
    return need


class TensorMapper:
    """Turns GGUF tensors into (our name, float32 tensor) pairs, one call per GGUF tensor."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.pending_kv_b: dict[int, dict[str, torch.Tensor]] = {}

    def map(self, name: str, tensor: Any) -> Iterator[tuple[str, torch.Tensor]]:
        if name in _GLOBAL:
            yield _GLOBAL[name], dequantize(tensor)
            return
        m = _NAME.fullmatch(name)
        if not m:
            raise CheckpointError(f"unexpected GGUF tensor {name!r}: not a tensor of a supported model")
        layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"model.layers.{layer}."
        cfg = self.config
        if part in _EXPERTS and kind == "weight":
            yield from self._experts(prefix, _EXPERTS[part], tensor)
        elif part in _SHARED and kind == "weight":
            yield f"{prefix}{_shared_prefix(cfg)}.{_SHARED[part]}.weight", dequantize(tensor)
        elif part == "exp_probs_b" and kind == "bias":
            yield prefix + "mlp.gate.e_score_correction_bias", dequantize(tensor)
        elif part in ("attn_k_b", "attn_v_b") and kind == "weight":
            yield from self._kv_b(layer, prefix, part, dequantize(tensor))
        elif part in _LAYER:
            w = dequantize(tensor)
            if part == "ffn_gate_inp_shexp":
                w = w.reshape(1, -1)                 # llama.cpp keeps it 1-D [H]; ours is Linear(H, 1)
            if cfg.model_type == "mixtral" and part in ("attn_q", "attn_k"):
                w = _unpermute(w, cfg.num_attention_heads if part == "attn_q" else cfg.num_kv_heads)
            yield f"{prefix}{_LAYER[part]}.{kind}", w
        else:
            raise CheckpointError(f"unexpected GGUF tensor {name!r}: the {cfg.model_type} model has no such weight")

    def _experts(self, prefix: str, parts: tuple[str, ...], tensor: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Stacked [E, rows, cols] -> one tensor per expert (dequantised one expert at a time)."""
        data = tensor.data
        if data.ndim != 3:
            raise CheckpointError(f"GGUF tensor {tensor.name!r} has {data.ndim} dimensions; stacked experts have 3")
        for e in range(data.shape[0]):
            w = dequantize(tensor, data[e])                            # [rows, cols]
            for part, chunk in zip(parts, w.chunk(len(parts), dim=0)):
                yield f"{prefix}mlp.experts.{e}.{part}.weight", chunk

    def _kv_b(self, layer: int, prefix: str, part: str, w: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """attn_k_b [N, L, D] + attn_v_b [N, V, L] -> kv_b_proj [N*(D+V), L] (per head: D rows of k, V of v)."""
        got = self.pending_kv_b.setdefault(layer, {})
        got[part] = w
        if len(got) < 2:
            return
        del self.pending_kv_b[layer]
        k_b, v_b = got["attn_k_b"], got["attn_v_b"]
        if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
            raise CheckpointError(f"misshaped GGUF attn_k_b {tuple(k_b.shape)} / attn_v_b {tuple(v_b.shape)} "
                                  f"in layer {layer}: expected [N, L, D] and [N, V, L]")
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1)          # [N, D+V, L]
        yield prefix + "self_attn.kv_b_proj.weight", kv_b.reshape(-1, kv_b.shape[-1])
