"""GGUF metadata -> the Hugging Face config.json dict that `ModelConfig.from_dict` normalises.

One config parser: this module only renames llama.cpp's keys back to the transformers names (and
reads a few facts from the tensor names), then `ModelConfig.from_dict` does all defaults and checks.
Keys are the ones `convert_hf_to_gguf.py` writes (llama.cpp `conversion/base.py`
`TextModel.set_gguf_parameters`, `conversion/qwen.py` `Qwen2MoeModel`, `conversion/deepseek.py`
`DeepseekV2Model`, `conversion/olmo.py` `OlmoeModel`; key strings in gguf-py/gguf/constants.py `Keys`).

Where the file says nothing and llama.cpp's graph hard-codes a choice, we take the family's reference
semantics (docs/GGUF.md lists each case):
- Qwen2-MoE top-k renormalisation: `expert_weights_norm` if present, else off (transformers'
  Qwen2MoeConfig default and every released Qwen1.5/Qwen2 MoE; llama.cpp src/models/qwen2moe.cpp
  hard-codes off);
- Qwen3-MoE: `expert_weights_norm` if present, else on (every released Qwen3-MoE; qwen3moe.cpp
  hard-codes on);
- OLMoE: `expert_weights_norm` if present, else off (olmoe.cpp hard-codes off);
- DeepSeek: the converter writes `expert_weights_norm` only when true, so absent = off;
  `expert_gating_func` sigmoid = DeepSeek-V3 (noaux_tc, groups scored by the sum of their two best
  experts), softmax or absent = DeepSeek-V2 (groups scored by their best expert, as DeepSeek's and
  transformers' V2 code do; llama.cpp's build_moe_ffn scores every family's groups by the top two).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from hybrimoe.errors import ConfigError

if TYPE_CHECKING:
    from hybrimoe.config import ModelConfig
    from hybrimoe.gguf.files import GGUFModelFiles

log = logging.getLogger(__name__)

# general.architecture -> our model_type (deepseek2 is split into V2 / V3 below)
ARCHITECTURES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe",
                 "deepseek2": "deepseek_v2"}
GATING_SOFTMAX, GATING_SIGMOID = 1, 2     # gguf-py ExpertGatingFuncType
_BLOCK = re.compile(r"blk\.(\d+)\.")


class _Meta:
    """Typed reads of `{arch}.KEY` metadata; a missing required key is a ConfigError naming it."""

    def __init__(self, metadata: dict[str, Any], arch: str) -> None:
        self.metadata, self.arch = metadata, arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def need(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.metadata:
            raise ConfigError(f"GGUF metadata lacks {full!r}")
        return self.metadata[full]


def model_config(files: GGUFModelFiles) -> ModelConfig:
    """The ModelConfig of an opened GGUF model; a ConfigError names the file."""
    from hybrimoe.config import ModelConfig

    try:
        d = hf_config_from_gguf(files.metadata, {name for name, _, _ in files.tensors()})
        config = ModelConfig.from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"{files.paths[0]}: {exc}") from None
    if config.model_type == "deepseek_v2" and config.norm_topk_prob:
        log.warning("%s says expert_weights_norm=true; the DeepSeek-V2 router, like transformers', does "
                    "not renormalise top-k weights", files.paths[0])
    return config


def gguf_model_type(metadata: dict[str, Any]) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)} "
                          "(llama only as Mixtral, with experts)")
    if arch == "deepseek2":
        return "deepseek_v3" if metadata.get("deepseek2.expert_gating_func") == GATING_SIGMOID else "deepseek_v2"
    return ARCHITECTURES[arch]


def _layers_with(names: set[str], part: str) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _BLOCK.match(n)) and n[m.end():].startswith(part + ".")}


def _rope(m: _Meta) -> dict[str, Any]:
    """rope_theta and rope_parameters (YaRN) from `{arch}.rope.*`."""
    out: dict[str, Any] = {}
    if (theta := m.get("rope.freq_base")) is not None:
        out["rope_theta"] = float(theta)
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return out
    if kind != "yarn":
        raise ConfigError(f"GGUF rope scaling {kind!r} is not supported (only yarn)")
    params: dict[str, Any] = {"rope_type": "yarn", "factor": float(m.need("rope.scaling.factor")),
                              "original_max_position_embeddings": int(m.need("rope.scaling.original_context_length"))}
    for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow"),
                      ("rope.scaling.yarn_attn_factor", "attention_factor")):
        if (value := m.get(key)) is not None:
            params[name] = float(value)
    if (log_mul := m.get("rope.scaling.yarn_log_multiplier")) is not None:
        # DeepSeek: the converter writes 0.1 * mscale_all_dim; mscale itself is not stored. Every
        # released DeepSeek-V2/V3 config has mscale == mscale_all_dim, which makes YaRN's cos/sin
        # factor 1 and leaves the softmax scale m(factor, mscale_all_dim)^2.
        params["mscale"] = params["mscale_all_dim"] = float(log_mul) / 0.1
    if "rope_theta" in out:
        params["rope_theta"] = out["rope_theta"]
    out["rope_parameters"] = params
    return out


# End-of-generation token texts that llama.cpp adds to the EOS ids whatever the metadata says
# (src/llama-vocab.cpp, llama_vocab::impl::load); the subset that MoE families here use.
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>",
             "<\uff5cend\u2581of\u2581sentence\uff5c>")


def _eos(metadata: dict[str, Any]) -> list[int]:
    """tokenizer.ggml.{eos,eot,eom}_token_id, then the ids of end-of-generation tokens by text."""
    ids = [metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    ids += [i for i, text in enumerate(tokens) if text in EOG_TEXTS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def hf_config_from_gguf(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A transformers-style config dict (model_type, hidden_size, ...) for `ModelConfig.from_dict`."""
    model_type = gguf_model_type(metadata)
    arch = metadata["general.architecture"]
    m = _Meta(metadata, arch)
    layers = int(m.need("block_count"))
    heads = int(m.need("attention.head_count"))
    experts = int(m.get("expert_count") or 0)
    if experts <= 0:
        raise ConfigError(f"GGUF {arch} model without experts ({arch}.expert_count missing or 0): "
                          "hybrimoe runs mixture-of-experts models only")
    vocab = m.get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise ConfigError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    d: dict[str, Any] = {
        "model_type": model_type, "architectures": [f"gguf:{arch}"],
        "num_hidden_layers": layers, "hidden_size": int(m.need("embedding_length")), "vocab_size": int(vocab),
        "num_attention_heads": heads, "num_key_value_heads": int(m.get("attention.head_count_kv") or heads),
        "num_experts": experts, "num_experts_per_tok": int(m.need("expert_used_count")),
        "max_position_embeddings": int(m.need("context_length")),
        "eos_token_id": _eos(metadata), "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "tie_word_embeddings": "output.weight" not in tensor_names, "hidden_act": "silu",
    }
    if (eps := m.get("attention.layer_norm_rms_epsilon")) is not None:
        d["rms_norm_eps"] = float(eps)
    d.update(_rope(m))
    if (clamp := m.get("attention.clamp_kqv")) is not None:
        d["clip_qkv"] = float(clamp)
    if (window := m.get("attention.sliding_window")) is not None:
        d["sliding_window"] = int(window)
    if model_type != "mixtral" and not model_type.startswith("deepseek") and m.get("attention.key_length"):
        d["head_dim"] = int(m.get("attention.key_length"))
    norm = m.get("expert_weights_norm")
    qkv_bias = "blk.0.attn_q.bias" in tensor_names
    moe = _layers_with(tensor_names, "ffn_gate_inp")

    if model_type == "mixtral":
        d["intermediate_size"] = int(m.need("feed_forward_length"))
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        d.update(moe_intermediate_size=int(m.need("expert_feed_forward_length")),
                 intermediate_size=int(m.get("feed_forward_length") or 0),
                 mlp_only_layers=sorted(set(range(layers)) - moe), decoder_sparse_step=1,
                 norm_topk_prob=bool(norm) if norm is not None else model_type == "qwen3_moe")
        if model_type == "qwen2_moe":
            d["qkv_bias"] = qkv_bias
            d["shared_expert_intermediate_size"] = int(m.get("expert_shared_feed_forward_length") or 0)
        else:
            d["attention_bias"] = qkv_bias
    elif model_type == "olmoe":
        d.update(intermediate_size=int(m.need("feed_forward_length")), attention_bias=qkv_bias,
                 norm_topk_prob=bool(norm))
    else:
        d.update(_deepseek(m, metadata, tensor_names, model_type))
    return d


def _deepseek(m: _Meta, metadata: dict[str, Any], names: set[str], model_type: str) -> dict[str, Any]:
    rope_dim = int(m.need("rope.dimension_count"))
    if m.get("attention.key_length_mla") is not None:      # converters since the attn_k_b/attn_v_b split
        qk_head, v_head = int(m.get("attention.key_length_mla")), int(m.need("attention.value_length_mla"))
    else:                                                    # older files: plain MHA key/value lengths
        qk_head, v_head = int(m.need("attention.key_length")), int(m.need("attention.value_length"))
    gating = m.get("expert_gating_func", GATING_SOFTMAX)
    groups = int(m.get("expert_group_count") or 1)
    v3 = model_type == "deepseek_v3"
    d: dict[str, Any] = {
        "num_key_value_heads": int(m.need("attention.head_count")),   # MLA: the file says 1 (MQA view)
        "intermediate_size": int(m.need("feed_forward_length")),
        "moe_intermediate_size": int(m.need("expert_feed_forward_length")),
        "first_k_dense_replace": int(m.get("leading_dense_block_count") or 0), "moe_layer_freq": 1,
        "n_shared_experts": int(m.get("expert_shared_count") or 0),
        "kv_lora_rank": int(m.need("attention.kv_lora_rank")),
        "q_lora_rank": None if m.get("attention.q_lora_rank") is None else int(m.get("attention.q_lora_rank")),
        "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": qk_head - rope_dim, "v_head_dim": v_head,
        "scoring_func": "sigmoid" if gating == GATING_SIGMOID else "softmax",
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if groups > 1 else "greedy"),
        "n_group": groups, "topk_group": int(m.get("expert_group_used_count") or 1),
        "norm_topk_prob": bool(m.get("expert_weights_norm", False)),
        "attention_bias": "blk.0.attn_kv_a_mqa.bias" in names, "rope_interleave": True,
    }
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise ConfigError(f"GGUF deepseek2.expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    if (scale := m.get("expert_weights_scale")) is not None:
        d["routed_scaling_factor"] = float(scale)
    return d
