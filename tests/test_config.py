"""ModelConfig normalises real hub config.json files of every family (and transformers-5 ones)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybrimoe.config import SUPPORTED_MODEL_TYPES, ModelConfig
from hybrimoe.errors import ConfigError

# Trimmed copies of the hub config.json files (the fields the engine reads, as the hub spells them).
MIXTRAL_8X7B = {
    "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, "vocab_size": 32000,
    "max_position_embeddings": 32768, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
}
QWEN15_MOE = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "norm_topk_prob": False, "decoder_sparse_step": 1,
    "vocab_size": 151936, "rope_theta": 1e6, "eos_token_id": 151643, "max_position_embeddings": 8192,
    "use_sliding_window": False, "sliding_window": 32768, "hidden_act": "silu",
}
QWEN3_30B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "intermediate_size": 6144, "norm_topk_prob": True, "mlp_only_layers": [],
    "decoder_sparse_step": 1, "vocab_size": 151936, "rope_theta": 1e6, "rope_scaling": None,
    "eos_token_id": 151645, "max_position_embeddings": 40960, "attention_bias": False, "hidden_act": "silu",
}
OLMOE = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "clip_qkv": None, "vocab_size": 50304, "eos_token_id": 50279, "rope_theta": 10000.0, "norm_topk_prob": False,
    "max_position_embeddings": 4096,
}
YARN_V2 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
           "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    "scoring_func": "softmax", "norm_topk_prob": False, "rope_theta": 10000, "rope_scaling": YARN_V2,
    "max_position_embeddings": 163840, "vocab_size": 102400, "bos_token_id": 100000, "eos_token_id": 100001,
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "norm_topk_prob": True, "num_nextn_predict_layers": 1, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 163840, "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1,
}


def test_mixtral() -> None:
    c = ModelConfig.from_dict(MIXTRAL_8X7B)
    assert (c.num_experts, c.top_k, c.moe_intermediate_size, c.head_dim) == (8, 2, 14336, 128)
    assert c.moe_layers == tuple(range(32)) and c.dense_layers == ()
    assert c.expert_bytes(2) == 3 * 14336 * 4096 * 2
    assert c.rope_theta == 1e6 and c.rope_scaling is None and c.norm_topk_prob
    assert c.eos_token_ids == (2,) and c.shared_expert_intermediate_size == 0


def test_qwen2_moe_shared_expert_and_dense_layers() -> None:
    c = ModelConfig.from_dict(QWEN15_MOE)
    assert c.shared_expert_intermediate_size == 5632 and c.shared_expert_gated
    assert c.qkv_bias and not c.norm_topk_prob and c.sliding_window is None
    sparse = ModelConfig.from_dict({**QWEN15_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert sparse.moe_layers == tuple(i for i in range(24) if i % 2 == 1 and i != 3)
    assert 3 in sparse.dense_layers and 0 in sparse.dense_layers


def test_qwen3_moe_head_dim_and_qk_norm() -> None:
    c = ModelConfig.from_dict(QWEN3_30B)
    assert c.head_dim == 128 != c.hidden_size // c.num_attention_heads
    assert c.qk_norm == "head" and c.num_kv_heads == 4 and c.norm_topk_prob
    assert c.moe_layers == tuple(range(48)) and c.eos_token_ids == (151645,)


def test_olmoe_full_width_qk_norm() -> None:
    c = ModelConfig.from_dict(OLMOE)
    assert c.qk_norm == "full" and c.clip_qkv is None and c.moe_intermediate_size == 1024
    assert c.expert_bytes(4) == 3 * 1024 * 2048 * 4


def test_deepseek_v2_lite() -> None:
    c = ModelConfig.from_dict(DEEPSEEK_V2_LITE)
    assert c.attention == "mla" and c.q_lora_rank is None and c.kv_lora_rank == 512
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert c.moe_layers == tuple(range(1, 27)) and c.dense_layers == (0,)
    assert c.shared_expert_intermediate_size == 2 * 1408 and not c.shared_expert_gated
    assert c.topk_method == "greedy" and c.scoring_func == "softmax" and c.uses_deepseek_router
    assert c.rope_scaling == {"rope_type": "yarn", **{k: v for k, v in YARN_V2.items() if k != "type"}}
    assert c.bos_token_id == 100000 and c.eos_token_ids == (100001,)


def test_deepseek_v2_group_limited_router() -> None:
    c = ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8,
                               "topk_group": 3, "n_routed_experts": 160, "routed_scaling_factor": 16.0})
    assert c.uses_deepseek_router and (c.n_group, c.topk_group, c.routed_scaling_factor) == (8, 3, 16.0)


@pytest.mark.parametrize("change,message", [
    ({"n_group": 256, "topk_group": 8}, "at least 2 experts per group"),
    ({"topk_group": 1, "num_experts_per_tok": 40}, "exceeds the 32 experts of topk_group 1"),
])
def test_deepseek_v3_group_settings_that_cannot_route(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**DEEPSEEK_V3, **change})


def test_deepseek_v3_sigmoid_router_and_fp8_rejection() -> None:
    c = ModelConfig.from_dict(DEEPSEEK_V3)
    assert (c.topk_method, c.scoring_func, c.n_group, c.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert c.moe_layers == tuple(range(3, 61)) and c.num_nextn_predict_layers == 1
    assert c.routed_scaling_factor == 2.5 and c.norm_topk_prob
    with pytest.raises(ConfigError, match="fp8"):
        ModelConfig.from_dict({**DEEPSEEK_V3, "quantization_config": {"quant_method": "fp8"}})


def test_rope_parameters_and_rope_scaling_agree() -> None:
    hub = ModelConfig.from_dict(DEEPSEEK_V3)
    v5 = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**DEEPSEEK_V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    assert ModelConfig.from_dict(v5) == hub
    assert hash(ModelConfig.from_dict(v5)) == hash(hub)          # usable as a dict key
    plain = {**QWEN3_30B, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert ModelConfig.from_dict(plain).rope_theta == 5e5 and ModelConfig.from_dict(plain).rope_scaling is None


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ConfigError, match="llama.*mixtral.*deepseek_v3"):
        ModelConfig.from_dict({**MIXTRAL_8X7B, "model_type": "llama"})
    assert len(SUPPORTED_MODEL_TYPES) == 6


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "hidden_size"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"num_key_value_heads": 5}, "num_key_value_heads 5"),
    ({"num_key_value_heads": "eight"}, "num_key_value_heads"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"quantization_config": "gptq"}, "gptq"),
    ({"sliding_window": "4k"}, "sliding_window"),
])
def test_invalid_fields_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**MIXTRAL_8X7B, **change})


@pytest.mark.parametrize("hub", [MIXTRAL_8X7B, QWEN15_MOE, QWEN3_30B, OLMOE, DEEPSEEK_V2_LITE, DEEPSEEK_V3],
                         ids=lambda d: d["model_type"])
def test_fields_absent_from_the_file_take_transformers_defaults(hub: dict) -> None:
    """The trimmed files above leave out e.g. rms_norm_eps: we must fill in what transformers would."""
    from transformers import AutoConfig

    trimmed = {k: v for k, v in hub.items() if k not in ("rms_norm_eps", "head_dim", "n_group", "topk_group")}
    ours = ModelConfig.from_dict(trimmed)
    theirs = AutoConfig.for_model(**trimmed)
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    if hub["model_type"] == "deepseek_v3":   # transformers' V3 router always groups
        assert (ours.n_group, ours.topk_group) == (theirs.n_group, theirs.topk_group)
    if ours.attention == "mha":
        expected = getattr(theirs, "head_dim", None) or hub["hidden_size"] // hub["num_attention_heads"]
        assert ours.head_dim == expected
    with_head_dim = ModelConfig.from_dict({**hub, "head_dim": 96})
    assert with_head_dim.head_dim == (96 if ours.attention == "mha" else ours.head_dim)


def test_from_pretrained_reads_transformers_configs(tiny_checkpoint, tmp_path) -> None:
    c = ModelConfig.from_pretrained(tiny_checkpoint("qwen2-moe"))
    assert c.model_type == "qwen2_moe" and c.moe_layers == (0, 2) and len(c.eos_token_ids) == 2
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_pretrained(tmp_path)


def test_config_module_does_not_import_torch() -> None:
    code = ("import sys, json, hybrimoe.config as c; "
            f"c.ModelConfig.from_dict(json.loads({json.dumps(json.dumps(MIXTRAL_8X7B))})); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
