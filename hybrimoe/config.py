"""`ModelConfig`: one frozen dataclass normalised from a Hugging Face `config.json` (GGUF metadata is
first renamed to config.json keys by `hybrimoe.gguf.metadata`, then normalised here too).

Every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3) maps onto the
same fields; family quirks are fields too (attention kind, q/k norm, router method, shared experts,
dense layers). Pure Python: the simulator imports this module, so it must not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hybrimoe.errors import ConfigError
from hybrimoe.jsonfile import read_json_object

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int                       # per-head width of q/k/v for "mha"; qk_rope_head_dim for "mla"
    intermediate_size: int              # dense MLP layers (0 if the model has none)
    num_experts: int
    top_k: int
    moe_intermediate_size: int          # I of one routed expert
    moe_layers: tuple[int, ...]         # indices of layers with routed experts
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # --- rotary position embedding
    rope_theta: float = 10000.0
    # None = plain RoPE; else {"rope_type": "yarn", "factor": ..., ...} (left out of the hash: a dict)
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    rope_interleave: bool = False                # DeepSeek: rotary pairs are (even, odd) lanes
    # --- attention
    attention: str = "mha"              # "mha" (MHA/GQA) or "mla" (DeepSeek multi-head latent attention)
    qkv_bias: bool = False              # bias on q/k/v projections (Qwen2-MoE)
    o_bias: bool = False                # bias on the output projection
    qk_norm: str = "none"               # "none" | "head" (Qwen3, per head) | "full" (OLMoE, full width)
    clip_qkv: float | None = None       # OLMoE: clamp q/k/v to [-c, c]
    sliding_window: int | None = None   # Mixtral: attend to the last W positions only
    kv_lora_rank: int = 0               # MLA fields (0 / None when attention == "mha")
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # --- router
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # --- shared experts and dense layers
    shared_expert_intermediate_size: int = 0     # 0 if none
    shared_expert_gated: bool = False            # Qwen2-MoE: output * sigmoid(shared_expert_gate(x))
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    num_nextn_predict_layers: int = 0            # DeepSeek-V3 multi-token-prediction layers (not run)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived values
    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate and up [I, H], down [H, I]."""
        return 3 * self.moe_intermediate_size * self.hidden_size

    def expert_bytes(self, bytes_per_param: float) -> int:
        """Bytes of one routed expert at `bytes_per_param` (4 fp32, 2 bf16/fp16)."""
        return int(self.expert_params * bytes_per_param)

    @property
    def uses_deepseek_router(self) -> bool:
        # every DeepSeek family: transformers' V2 "greedy" router never renormalises (norm_topk_prob ignored)
        return (self.model_type.startswith("deepseek") or self.topk_method != "greedy"
                or self.scoring_func != "softmax")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        """From a Hugging Face directory (config.json), or a GGUF file / directory (`from_gguf`)."""
        from hybrimoe.gguf.files import is_gguf_path

        if is_gguf_path(model_dir):
            return cls.from_gguf(model_dir)
        path = os.path.join(os.fspath(model_dir), "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {os.fspath(model_dir)!r}")
        return cls.from_dict(read_json_object(path, "model config"))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "ModelConfig":
        """From a GGUF file's metadata: renamed to config.json keys (hybrimoe.gguf.metadata), then `from_dict`."""
        from hybrimoe.gguf.files import open_gguf
        from hybrimoe.gguf.metadata import model_config

        return model_config(open_gguf(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("quantization_config"):
            quant = d["quantization_config"]
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise ConfigError(f"quantized checkpoints ({method}) are not supported; "
                              "use a bf16/fp16/fp32 checkpoint")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
        return _normalise(model_type, d)

    def validate(self) -> None:
        """Checks relations between fields; raises ConfigError naming the first violated one."""
        for name in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_experts",
                     "moe_intermediate_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % max(self.num_kv_heads, 1):
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.top_k} must be in 1..{self.num_experts}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func {self.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")
        if self.topk_method != "greedy" and (self.n_group < 1 or self.num_experts % self.n_group
                                             or not 0 < self.topk_group <= self.n_group):
            raise ConfigError(f"n_group {self.n_group} / topk_group {self.topk_group} do not divide "
                              f"{self.num_experts} experts")
        if self.topk_method != "greedy":
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:   # top-k would pick masked-out experts
                raise ConfigError(f"num_experts_per_tok {self.top_k} exceeds the {self.topk_group * per_group} "
                                  f"experts of topk_group {self.topk_group} groups")
            if self.topk_method == "noaux_tc" and per_group < 2:   # groups are scored by their 2 best
                raise ConfigError(f"noaux_tc needs at least 2 experts per group; n_group {self.n_group} "
                                  f"leaves {per_group} of {self.num_experts}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"MoE layer indices {bad} outside 0..{self.num_layers - 1}")


def _get(d: dict[str, Any], key: str, default: Any = None) -> Any:
    value = d.get(key)
    return default if value is None else value


def _int(d: dict[str, Any], key: str, default: int | None = None) -> int:
    """d[key] as an int; `default` when absent or null; ConfigError when neither."""
    value = d.get(key)
    if value is None:
        value = default
    if value is None:
        raise ConfigError(f"config.json lacks {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ConfigError(f"config.json: {key!r} must be an integer, got {value!r}")
    return int(value)


def _float(d: dict[str, Any], key: str, default: float) -> float:
    """d[key] as a float; `default` when absent or null; ConfigError when not a number."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {key!r} must be a number, got {value!r}")
    return float(value)


def _int_list(d: dict[str, Any], key: str) -> tuple[int, ...]:
    """d[key] (a list of integers, or a single one) as a tuple; () when absent or null."""
    value = d.get(key)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConfigError(f"config.json: {key!r} must be an integer or a list of integers, got {value!r}")
    return tuple(items)


def _num_experts(d: dict[str, Any]) -> int:
    """Routed experts, whichever alias the file uses (transformers renames them between versions)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if d.get(key) is not None:
            return _int(d, key)
    raise ConfigError("config.json lacks the number of experts "
                      "(num_local_experts / num_experts / n_routed_experts)")


def _rope(d: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from `rope_parameters` (transformers 5) or `rope_scaling` (hub)."""
    raw = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: rope_parameters / rope_scaling must be an object, got {raw!r}")
    params = dict(raw)
    theta = _float(params, "rope_theta", _float(d, "rope_theta", default_theta))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("rope_theta", None)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _eos(d: dict[str, Any]) -> tuple[int, ...]:
    return _int_list(d, "eos_token_id")


def _normalise(model_type: str, d: dict[str, Any]) -> ModelConfig:
    hidden = _int(d, "hidden_size")
    heads = _int(d, "num_attention_heads")
    layers = _int(d, "num_hidden_layers")
    common: dict[str, Any] = dict(
        model_type=model_type, num_layers=layers, hidden_size=hidden, vocab_size=_int(d, "vocab_size"),
        num_attention_heads=heads, num_kv_heads=_int(d, "num_key_value_heads", heads) or heads,
        max_position_embeddings=_int(d, "max_position_embeddings", 4096), eos_token_ids=_eos(d),
        bos_token_id=d.get("bos_token_id"),
        # transformers' defaults when the file omits it: 1e-5 for Mixtral and OLMoE, 1e-6 for the others
        rms_norm_eps=_float(d, "rms_norm_eps", 1e-5 if model_type in ("mixtral", "olmoe") else 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        extra={"architectures": tuple(d.get("architectures") or ()),
               "dtype": d.get("torch_dtype") or d.get("dtype")},
    )
    head_dim = _int(d, "head_dim", 0) or hidden // heads   # MHA families; DeepSeek's is set below
    theta, scaling = _rope(d, 1e6 if model_type == "mixtral" else 10000.0)
    common.update(rope_theta=theta, rope_scaling=scaling)

    if model_type == "mixtral":
        cfg = dict(head_dim=head_dim, intermediate_size=0, num_experts=_num_experts(d),
                   top_k=_int(d, "num_experts_per_tok", 2), moe_intermediate_size=_int(d, "intermediate_size"),
                   moe_layers=tuple(range(layers)), sliding_window=_int(d, "sliding_window", 0) or None,
                   norm_topk_prob=True)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        if d.get("use_sliding_window"):
            raise ConfigError(f"{model_type}: use_sliding_window=true is not supported")
        num_experts = _num_experts(d)
        mlp_only = _int_list(d, "mlp_only_layers")
        step = _int(d, "decoder_sparse_step", 1)
        moe = tuple(i for i in range(layers)
                    if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
        qwen2 = model_type == "qwen2_moe"
        shared = _int(d, "shared_expert_intermediate_size", 0) if qwen2 else 0
        cfg = dict(head_dim=head_dim, intermediate_size=_int(d, "intermediate_size"), num_experts=num_experts,
                   top_k=_int(d, "num_experts_per_tok"), moe_intermediate_size=_int(d, "moe_intermediate_size"),
                   moe_layers=moe, norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   qkv_bias=bool(d.get("qkv_bias", True)) if qwen2 else bool(d.get("attention_bias", False)),
                   o_bias=False if qwen2 else bool(d.get("attention_bias", False)),
                   qk_norm="none" if qwen2 else "head", shared_expert_intermediate_size=shared,
                   shared_expert_gated=shared > 0, decoder_sparse_step=step, mlp_only_layers=mlp_only)
    elif model_type == "olmoe":
        bias = bool(d.get("attention_bias", False))
        cfg = dict(head_dim=head_dim, intermediate_size=0, num_experts=_num_experts(d),
                   top_k=_int(d, "num_experts_per_tok"), moe_intermediate_size=_int(d, "intermediate_size"),
                   moe_layers=tuple(range(layers)), norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   qkv_bias=bias, o_bias=bias, qk_norm="full",
                   clip_qkv=None if d.get("clip_qkv") is None else _float(d, "clip_qkv", 0.0))
    else:  # deepseek_v2 / deepseek_v3
        cfg = _deepseek(model_type, d, layers)
    common.update(cfg)
    return _finish(ModelConfig(**common))


def _deepseek(model_type: str, d: dict[str, Any], layers: int) -> dict[str, Any]:
    v3 = model_type == "deepseek_v3"
    num_experts = _num_experts(d)
    first_dense = _int(d, "first_k_dense_replace", 3 if v3 else 0)
    freq = _int(d, "moe_layer_freq", 1)
    moe = tuple(i for i in range(layers) if num_experts > 0 and i >= first_dense and i % freq == 0)
    moe_inter = _int(d, "moe_intermediate_size")
    n_shared = _int(d, "n_shared_experts", 0)
    rope_dim = _int(d, "qk_rope_head_dim", 64)
    topk_method = _get(d, "topk_method", "noaux_tc" if v3 else "greedy")
    n_group = _int(d, "n_group", 8 if v3 else 1)          # transformers' DeepseekV3Config: 8 groups, best 4
    topk_group = _int(d, "topk_group", 4 if v3 else 1)
    return dict(
        num_kv_heads=_int(d, "num_attention_heads"),  # MLA: every head has its own k/v
        head_dim=rope_dim, intermediate_size=_int(d, "intermediate_size"), num_experts=num_experts,
        top_k=_int(d, "num_experts_per_tok"), moe_intermediate_size=moe_inter, moe_layers=moe,
        attention="mla", qkv_bias=bool(d.get("attention_bias", False)),
        o_bias=bool(d.get("attention_bias", False)),
        rope_interleave=bool(d.get("rope_interleave", True)),
        kv_lora_rank=_int(d, "kv_lora_rank"),
        q_lora_rank=None if d.get("q_lora_rank") is None else _int(d, "q_lora_rank"),
        qk_nope_head_dim=_int(d, "qk_nope_head_dim"), qk_rope_head_dim=rope_dim,
        v_head_dim=_int(d, "v_head_dim"),
        topk_method=topk_method, scoring_func=_get(d, "scoring_func", "sigmoid" if v3 else "softmax"),
        norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
        routed_scaling_factor=_float(d, "routed_scaling_factor", 2.5 if v3 else 1.0),
        n_group=n_group, topk_group=topk_group,
        shared_expert_intermediate_size=n_shared * moe_inter, n_shared_experts=n_shared,
        first_k_dense_replace=first_dense, moe_layer_freq=freq,
        num_nextn_predict_layers=_int(d, "num_nextn_predict_layers", 0) if v3 else 0,
    )


def _finish(config: ModelConfig) -> ModelConfig:
    config.validate()
    return config
