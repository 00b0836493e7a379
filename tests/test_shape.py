"""ModelShape: named shapes carry the facts of each model; HF configs of every family are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrimoe.errors import ConfigError
from hybrimoe.policy.shape import ModelShape, known_shapes

# name -> (layers, MoE layers, experts, top-k, hidden, expert I, shared width, attention kind)
FACTS = {
    "mixtral-8x7b": (32, 32, 8, 2, 4096, 14336, 0, "gqa"),
    "qwen2-57b-a14b": (28, 28, 64, 8, 3584, 2560, 20480, "gqa"),
    "deepseek-v2-lite": (27, 26, 64, 6, 2048, 1408, 2 * 1408, "mla"),
    "qwen1.5-moe-a2.7b": (24, 24, 60, 4, 2048, 1408, 5632, "gqa"),
    "qwen3.6-35b-a3b": (40, 40, 256, 8, 2048, 512, 512, "gqa"),
}
# total parameters in billions, as each model's name states
TOTAL_B = {"mixtral-8x7b": 46.7, "qwen2-57b-a14b": 57.4, "deepseek-v2-lite": 15.7, "qwen1.5-moe-a2.7b": 14.3,
           "qwen3.6-35b-a3b": 35.0}


def total_params(s: ModelShape) -> float:
    dense = sum(s.attention_params(l) + s.dense_mlp_params(l) for l in range(s.num_layers))
    return s.expert_params * s.routed_expert_count + dense + 2 * s.hidden * s.vocab_size


@pytest.mark.parametrize("name", sorted(FACTS))
def test_named_shape_facts(name: str) -> None:
    s = ModelShape.named(name)
    layers, moe, experts, top_k, hidden, inter, shared, kind = FACTS[name]
    assert (s.num_layers, len(s.moe_layers), s.num_experts, s.top_k) == (layers, moe, experts, top_k)
    assert (s.hidden, s.moe_intermediate, s.shared_intermediate, s.attention.kind) == (hidden, inter, shared, kind)
    assert s.expert_params == 3 * hidden * inter
    assert s.expert_bytes(4) == pytest.approx(3 * hidden * inter / 2)
    assert total_params(s) / 1e9 == pytest.approx(TOTAL_B[name], rel=0.03)


def test_known_shapes_and_errors(tmp_path: Path) -> None:
    assert set(FACTS) <= set(known_shapes())
    with pytest.raises(ConfigError, match="known: .*mixtral-8x7b"):
        ModelShape.named("gpt-5")
    with pytest.raises(ConfigError, match="not found"):
        ModelShape.named(str(tmp_path / "absent.json"))
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
                               "num_attention_heads": 2, "vocab_size": 10}))
    with pytest.raises(ConfigError, match="lacks num_local_experts"):
        ModelShape.named(str(bad))


def test_deepseek_dense_first_layer_and_path(tmp_path: Path) -> None:
    s = ModelShape.named("deepseek-v2-lite")
    assert s.moe_layers[0] == 1 and s.dense_layers == (0,) and s.dense_intermediate == 10944
    assert s.dense_mlp_params(0) == 3 * 2048 * 10944
    (tmp_path / "m").mkdir()
    src = Path(__file__).resolve().parents[1] / "hybrimoe" / "shapes" / "deepseek-v2-lite.json"
    (tmp_path / "m" / "config.json").write_text(src.read_text())
    from_dir = ModelShape.named(str(tmp_path / "m"))
    assert from_dir.name == "m" and from_dir.moe_layers == s.moe_layers


def test_families_read_loosely() -> None:
    olmoe = ModelShape.from_hf_config({"model_type": "olmoe", "num_hidden_layers": 16, "hidden_size": 2048,
                                       "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                                       "num_attention_heads": 16, "vocab_size": 50304}, "olmoe")
    assert (olmoe.moe_intermediate, olmoe.shared_intermediate, olmoe.attention.head_dim) == (1024, 0, 128)
    qwen3 = ModelShape.from_hf_config({"model_type": "qwen3_moe", "num_hidden_layers": 4, "hidden_size": 64,
                                       "intermediate_size": 256, "moe_intermediate_size": 32, "num_experts": 8,
                                       "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "head_dim": 32, "mlp_only_layers": [0], "vocab_size": 100}, "q3")
    assert qwen3.moe_layers == (1, 2, 3) and qwen3.dense_intermediate == 256 and qwen3.attention.head_dim == 32
    v3 = ModelShape.from_hf_config({"model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
                                    "moe_intermediate_size": 2048, "intermediate_size": 18432, "n_routed_experts": 256,
                                    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                                    "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
                                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                                    "vocab_size": 129280}, "v3")
    assert len(v3.moe_layers) == 58 and v3.attention.q_lora_rank == 1536 and v3.shared_intermediate == 2048
    wrapped = ModelShape.from_hf_config({"model_type": "qwen3_5_moe", "text_config": json.loads(
        (Path(__file__).resolve().parents[1] / "hybrimoe" / "shapes" / "qwen3.6-35b-a3b.json").read_text())}, "w")
    assert len(wrapped.linear_attention_layers) == 30 and 3 not in wrapped.linear_attention_layers


def test_attention_geometry_grows_with_context() -> None:
    for name in FACTS:
        s = ModelShape.named(name)
        full = next(l for l in s.moe_layers if l not in s.linear_attention_layers)
        assert s.attention_core_flops(full, 1, 1000) > s.attention_core_flops(full, 1, 10) > 0
        assert s.kv_cache_bytes(full, 1000) == pytest.approx(100 * s.kv_cache_bytes(full, 10))
    mixtral = ModelShape.named("mixtral-8x7b")  # GQA: 8 kv heads of 128, k and v, bf16
    assert mixtral.kv_cache_bytes(0, 1) == 2 * 8 * 128 * 2
    assert mixtral.attention_params(0) == 4096 * 4096 * 2 + 2 * 4096 * 1024


def test_policy_side_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, hybrimoe.policy.cost, hybrimoe.policy.shape, hybrimoe.trace.importers, hybrimoe.data, "
            "hybrimoe.cli.calibrate, hybrimoe.cli.import_trace; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
