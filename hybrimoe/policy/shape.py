"""`ModelShape`: the sizes of a MoE model that the cost model needs, read loosely from a config.json.

Pure Python (no torch): the simulator and the cost model use it without loading a checkpoint.
Named shapes (`ModelShape.named("mixtral-8x7b")`) come from hybrimoe/shapes/<name>.json, copies of
the models' public Hugging Face config.json files (each with a "_source" note).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrimoe.errors import ConfigError
from hybrimoe.jsonfile import read_json_object

SHAPES_DIR = Path(__file__).resolve().parent.parent / "shapes"


@dataclass(frozen=True)
class ExpertShape:
    """One routed (or shared) SwiGLU expert: gate and up [I, H], down [H, I], stored at `bits` per weight."""

    hidden: int  # H
    intermediate: int  # I
    bits: float  # bits per parameter of the weight format, scales included (e.g. 4.5 for GGUF Q4_K)

    @property
    def params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def bytes(self) -> float:
        """Bytes of the expert's weights: 3*H*I params * bits / 8."""
        return self.params * self.bits / 8.0

    def flops(self, tokens: int) -> float:
        """FLOPs for `tokens` tokens: 3 matmuls of H*I multiply-adds each = 2*3*H*I per token."""
        return 2.0 * self.params * tokens


@dataclass(frozen=True)
class AttentionShape:
    """What the dense-time estimate needs about attention.

    kind: "gqa" (MHA/GQA: num_heads query heads, num_kv_heads key/value heads of head_dim),
          "mla" (DeepSeek latent attention: q_lora_rank, kv_lora_rank, qk_nope/qk_rope/v head dims).
    Hybrid models (Qwen3-Next/Qwen3.5 style) also have linear-attention (Gated DeltaNet) layers, listed
    in ModelShape.linear_attention_layers, described by the linear_* fields.
    """

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_lora_rank: int = 0  # 0 = q projected directly from the hidden state
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]  # layers with routed experts
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden: int
    moe_intermediate: int  # I of one routed expert
    shared_intermediate: int  # total width of the shared experts of a MoE layer, 0 if none
    dense_intermediate: int  # MLP width of the dense (non-MoE) layers, 0 if there are none
    vocab_size: int
    attention: AttentionShape
    linear_attention_layers: tuple[int, ...] = ()  # hybrid models: layers with linear attention

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    def expert_bytes(self, bits: float) -> float:
        """Bytes of one routed expert stored at `bits` per parameter."""
        return self.expert_params * bits / 8.0

    def expert_shape(self, bits: float) -> ExpertShape:
        return ExpertShape(self.hidden, self.moe_intermediate, bits)

    @property
    def routed_expert_count(self) -> int:
        """Routed experts in the whole model (what an expert cache ratio refers to)."""
        return self.num_experts * len(self.moe_layers)

    # ------------------------------------------------------------------ dense geometry (params, FLOPs)
    def attention_params(self, layer: int) -> int:
        """Weights of the attention projections of `layer` (q, k, v, o, or the MLA / linear equivalents)."""
        a, h = self.attention, self.hidden
        if layer in self.linear_attention_layers:
            k_width = a.linear_num_key_heads * a.linear_key_head_dim
            v_width = a.linear_num_value_heads * a.linear_value_head_dim
            # q, k, v, z (output gate) in, b and a (per value head) in, output projection
            return h * (2 * k_width + 2 * v_width + 2 * a.linear_num_value_heads) + v_width * h
        if a.kind == "mla":
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            q = h * a.num_heads * qk if a.q_lora_rank == 0 else a.q_lora_rank * (h + a.num_heads * qk)
            kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
            return q + kv + a.num_heads * a.v_head_dim * h
        q_out = a.num_heads * a.head_dim
        return h * q_out + 2 * h * a.num_kv_heads * a.head_dim + q_out * h

    def attention_core_flops(self, layer: int, tokens: int, context: int) -> float:
        """FLOPs of scores and weighted values for `tokens` new tokens after `context` cached ones.

        Causal full attention: token i attends to context + i + 1 keys, so the keys visited total
        tokens*context + tokens*(tokens+1)/2; each key costs 2*(qk_dim + v_dim) FLOPs per query head.
        Linear attention: state update and read-out, ~4 * key_dim * value_dim per value head per token.
        """
        a = self.attention
        if layer in self.linear_attention_layers:
            return 4.0 * a.linear_num_value_heads * a.linear_key_head_dim * a.linear_value_head_dim * tokens
        keys = tokens * context + tokens * (tokens + 1) / 2
        if a.kind == "mla":
            per_key = 2.0 * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
        else:
            per_key = 4.0 * a.head_dim
        return per_key * a.num_heads * keys

    def kv_cache_bytes(self, layer: int, positions: int, bytes_per_value: float = 2.0) -> float:
        """Bytes of attention state read per forward with `positions` cached positions (bf16 = 2 B)."""
        a = self.attention
        if layer in self.linear_attention_layers:  # fixed-size recurrent state, fp32
            return 4.0 * a.linear_num_value_heads * a.linear_key_head_dim * a.linear_value_head_dim
        if a.kind == "mla":  # compressed latent + rope key per position
            return positions * (a.kv_lora_rank + a.qk_rope_head_dim) * bytes_per_value
        return positions * 2 * a.num_kv_heads * a.head_dim * bytes_per_value

    def dense_mlp_params(self, layer: int) -> int:
        """Weights on the GPU besides attention: the dense MLP, or the shared experts + router of a MoE layer."""
        if layer in self.moe_layers:
            return 3 * self.hidden * self.shared_intermediate + self.hidden * self.num_experts
        return 3 * self.hidden * self.dense_intermediate

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_config(cls, d: dict[str, Any], name: str) -> "ModelShape":
        """Read the fields of a Hugging Face config.json (mixtral, qwen2_moe, qwen3_moe, olmoe,
        deepseek_v2/v3, qwen3_next / qwen3_5_moe and look-alikes); a nested "text_config" is used."""
        return _from_hf_config(d, name)

    @classmethod
    def from_file(cls, path: str | os.PathLike, name: str | None = None) -> "ModelShape":
        """From a config.json, or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json_object(path, "model config")
        default = path.stem if path.parent == SHAPES_DIR else path.parent.name
        return cls.from_hf_config(d, name or default)

    @classmethod
    def named(cls, name: str) -> "ModelShape":
        """A shipped named shape (see `known_shapes()`), or a path to a config.json / model directory."""
        file = SHAPES_DIR / f"{name}.json"
        if file.is_file():
            return cls.from_file(file, name)
        if os.path.sep in name or name.endswith(".json") or Path(name).is_dir():
            if Path(name).exists():
                return cls.from_file(name)
            raise ConfigError(f"model config {name} not found")
        raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(known_shapes())} "
                          "(or pass a path to a config.json)")


def known_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _get(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return default


def _int(d: dict[str, Any], name: str, *keys: str, default: int | None = None) -> int:
    value = _get(d, *keys, default=default)
    if value is None:
        raise ConfigError(f"model config of {name!r} lacks {' / '.join(keys)}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model config of {name!r}: {keys[0]} = {value!r} is not an integer") from None


def _moe_layers(d: dict[str, Any], model_type: str, num_layers: int, num_experts: int) -> tuple[int, ...]:
    if model_type.startswith("deepseek"):  # dense first k layers, then every moe_layer_freq-th
        first, freq = int(d.get("first_k_dense_replace", 0)), int(d.get("moe_layer_freq", 1))
        return tuple(i for i in range(num_layers) if i >= first and i % freq == 0)
    step = int(d.get("decoder_sparse_step", 1) or 1)  # qwen2_moe / qwen3_moe style
    dense = set(d.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0 and num_experts > 0)


def _linear_layers(d: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    types = d.get("layer_types")
    if isinstance(types, list) and types:
        return tuple(i for i, t in enumerate(types[:num_layers]) if "linear" in str(t))
    interval = d.get("full_attention_interval")
    if interval and d.get("linear_num_value_heads"):  # every interval-th layer is full attention
        return tuple(i for i in range(num_layers) if (i + 1) % int(interval) != 0)
    return ()


def _from_hf_config(config: dict[str, Any], name: str) -> ModelShape:
    d = dict(config)
    if isinstance(d.get("text_config"), dict):  # multimodal wrappers keep the LM under text_config
        d = {**d, **d["text_config"]}
    model_type = str(d.get("model_type", "unknown"))
    num_layers = _int(d, name, "num_hidden_layers", "n_layers", "num_layers")
    num_experts = _int(d, name, "num_local_experts", "n_routed_experts", "num_experts")
    top_k = _int(d, name, "num_experts_per_tok", "moe_top_k", "top_k")
    hidden = _int(d, name, "hidden_size", "d_model")
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ConfigError(f"model config of {name!r}: {num_experts} experts, top-{top_k} is not a MoE model")
    dense_width = int(_get(d, "intermediate_size", default=0) or 0)
    if model_type in ("mixtral", "olmoe") or "moe_intermediate_size" not in d:
        moe_intermediate = _int(d, name, "moe_intermediate_size", "intermediate_size")
    else:
        moe_intermediate = _int(d, name, "moe_intermediate_size")
    if model_type.startswith("deepseek"):
        shared = int(d.get("n_shared_experts") or 0) * moe_intermediate
    else:
        shared = int(_get(d, "shared_expert_intermediate_size", default=0) or 0)
    heads = _int(d, name, "num_attention_heads", "n_heads")
    if d.get("kv_lora_rank"):
        attention = AttentionShape(
            kind="mla", num_heads=heads, num_kv_heads=heads, head_dim=int(d.get("qk_rope_head_dim", 64)),
            q_lora_rank=int(d.get("q_lora_rank") or 0), kv_lora_rank=int(d["kv_lora_rank"]),
            qk_nope_head_dim=_int(d, name, "qk_nope_head_dim"), qk_rope_head_dim=_int(d, name, "qk_rope_head_dim"),
            v_head_dim=_int(d, name, "v_head_dim"))
    else:
        attention = AttentionShape(
            kind="gqa", num_heads=heads, num_kv_heads=int(_get(d, "num_key_value_heads", default=heads)),
            head_dim=int(_get(d, "head_dim", default=hidden // heads)),
            linear_num_key_heads=int(d.get("linear_num_key_heads") or 0),
            linear_num_value_heads=int(d.get("linear_num_value_heads") or 0),
            linear_key_head_dim=int(d.get("linear_key_head_dim") or 0),
            linear_value_head_dim=int(d.get("linear_value_head_dim") or 0))
    moe_layers = _moe_layers(d, model_type, num_layers, num_experts)
    dense_intermediate = dense_width if len(moe_layers) < num_layers else 0
    return ModelShape(name=name, model_type=model_type, num_layers=num_layers, moe_layers=moe_layers,
                      num_experts=num_experts, top_k=top_k, hidden=hidden, moe_intermediate=moe_intermediate,
                      shared_intermediate=shared, dense_intermediate=dense_intermediate,
                      vocab_size=_int(d, name, "vocab_size"), attention=attention,
                      linear_attention_layers=_linear_layers(d, num_layers))
