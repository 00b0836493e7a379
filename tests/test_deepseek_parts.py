"""DeepSeek attention against transformers: MLA + YaRN (prefill, then decode through the KV cache) on
random weights in float32, both attention forms. The routers are in test_deepseek_routing.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from hybrimoe.config import ModelConfig
from hybrimoe.models.kv_cache import KVCache
from hybrimoe.models.mla import MLAttention
from hybrimoe.models.yarn import RopeSpec, Rotary

YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
PREFILL, DECODE = 16, 6


def _hf_config(family: str, q_lora_rank: int | None, rope: dict | None, interleave: bool = True) -> Any:
    common = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=2560,
        rope_theta=10000.0,
        rope_scaling=dict(rope) if rope else None,
        num_hidden_layers=1,
        vocab_size=32,
    )
    if family == "v2":
        cfg = DeepseekV2Config(**common)
    else:
        cfg = DeepseekV3Config(**common, rope_interleave=interleave)
    cfg._attn_implementation = "eager"
    return cfg


def _ours_config(hf: Any) -> ModelConfig:
    d = hf.to_dict()
    d.update(
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        intermediate_size=16,
    )
    return ModelConfig.from_dict(d)


def _hf_attention_run(
    family: str, hf_cfg: Any, attn: torch.nn.Module, xs: list[torch.Tensor], offset: int = 0
) -> list[torch.Tensor]:
    """Run transformers' attention chunk by chunk (first chunk = prefill) through its DynamicCache;
    the rotary positions start at `offset`."""
    mod = hf_v2 if family == "v2" else hf_v3
    rotary = (mod.DeepseekV2RotaryEmbedding if family == "v2" else mod.DeepseekV3RotaryEmbedding)(hf_cfg)
    cache, start, outs = DynamicCache(config=hf_cfg), 0, []
    for x in xs:
        t = x.shape[0]
        pos = torch.arange(offset + start, offset + start + t)[None]
        pe = rotary(x[None], pos)
        s = start + t
        mask = torch.full((t, s), float("-inf")).triu(start + 1)[None, None]  # [1, 1, T, S] additive
        if family == "v2":
            out, _ = attn(x[None], attention_mask=mask, cache=cache, position_embeddings=pe)
        else:
            out, _ = attn(x[None], position_embeddings=pe, attention_mask=mask, cache=cache)
        outs.append(out[0])
        start = s
    return outs


@pytest.mark.parametrize(
    "family,q_lora_rank,rope,interleave",
    [
        ("v2", None, YARN, True),  # V2-Lite shape: no query compression
        ("v2", 24, YARN, True),  # V2
        ("v2", None, None, True),  # plain RoPE
        ("v3", 24, YARN, True),  # V3
        ("v3", None, YARN, False),  # V3 with half-split rotary pairs
    ],
)
@pytest.mark.parametrize("absorb", [False, True, None], ids=["expanded", "absorbed", "auto"])
def test_mla_matches_transformers(
    family: str, q_lora_rank: int | None, rope: dict | None, interleave: bool, absorb: bool | None
) -> None:
    torch.manual_seed(0)
    hf_cfg = _hf_config(family, q_lora_rank, rope, interleave)
    hf_attn = (hf_v2.DeepseekV2Attention if family == "v2" else hf_v3.DeepseekV3Attention)(hf_cfg, 0).eval()
    with torch.no_grad():
        for p in hf_attn.parameters():
            p.normal_(0.0, 0.3)
    ours = MLAttention(_ours_config(hf_cfg), 0).eval()
    ours.absorb = absorb
    missing, unexpected = ours.load_state_dict(hf_attn.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("rotary.") for name in missing)
    assert abs(ours.scale - hf_attn.scaling) < 1e-12

    xs = [torch.randn(PREFILL, 64)] + [torch.randn(1, 64) for _ in range(DECODE)]
    with torch.no_grad():
        expected = _hf_attention_run(family, hf_cfg, hf_attn, xs)
        kv = KVCache(num_layers=1, max_tokens=64)
        for x, want in zip(xs, expected):
            got = ours(x, torch.arange(kv.length, kv.length + x.shape[0]), [kv[0]], [x.shape[0]])
            kv.length += x.shape[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the cache holds the latent and the rotated shared key only: L + R numbers per token
    assert kv[0].k.shape == (1, 64, hf_cfg.kv_lora_rank) and kv[0].v.shape == (1, 64, hf_cfg.qk_rope_head_dim)


# DeepSeek-V2-Lite's attention (config.json of deepseek-ai/DeepSeek-V2-Lite)
V2_LITE = {
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "moe_intermediate_size": 1408,
    "intermediate_size": 10944,
    "num_hidden_layers": 1,
    "vocab_size": 102400,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
}


def test_mla_with_v2_lite_shapes_past_the_pretraining_context() -> None:
    """Real V2-Lite widths and YaRN, at positions 5000+ (beyond original_max_position_embeddings 4096)."""
    torch.manual_seed(2)
    hf_cfg = DeepseekV2Config(**{k: v for k, v in V2_LITE.items() if k != "model_type"})
    hf_cfg._attn_implementation = "eager"
    hf_attn = hf_v2.DeepseekV2Attention(hf_cfg, 0).eval()
    with torch.no_grad():
        for name, p in hf_attn.named_parameters():
            if "layernorm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.03)
    ours = MLAttention(ModelConfig.from_dict(V2_LITE), 0).eval()
    ours.load_state_dict(hf_attn.state_dict(), strict=False)
    xs = [torch.randn(PREFILL, 2048), torch.randn(1, 2048), torch.randn(1, 2048)]
    with torch.no_grad():
        expected = _hf_attention_run("v2", hf_cfg, hf_attn, xs, offset=5000)
        kv = KVCache(num_layers=1, max_tokens=PREFILL + 2)
        for x, want in zip(xs, expected):
            got = ours(x, torch.arange(5000 + kv.length, 5000 + kv.length + x.shape[0]), [kv[0]], [x.shape[0]])
            kv.length += x.shape[0]
            assert want.abs().max() > 0.1  # not a vanishing output
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mla_picks_absorbed_form_for_decode_only() -> None:
    hf_cfg = _hf_config("v2", None, YARN)
    ours = MLAttention(_ours_config(hf_cfg), 0)
    assert ours.absorbed_is_cheaper(1, 16) and ours.absorbed_is_cheaper(1, 4000)
    assert not ours.absorbed_is_cheaper(4000, 4000)


def test_yarn_frequencies_and_scales_match_transformers() -> None:
    hf_cfg = _hf_config("v3", 24, YARN)
    hf_rotary = hf_v3.DeepseekV3RotaryEmbedding(hf_cfg)
    spec = RopeSpec.from_hf(8, 10000.0, hf_cfg.rope_parameters, hf_cfg.max_position_embeddings)
    torch.testing.assert_close(spec.inv_freq(), hf_rotary.inv_freq, atol=0, rtol=0)
    assert spec.cos_sin_scale == pytest.approx(hf_rotary.attention_scaling, abs=1e-12)
    # YaRN stretches the low frequencies by `factor` and keeps the highest one
    plain = RopeSpec.from_hf(8, 10000.0, None, 2560).inv_freq()
    assert spec.inv_freq()[0] == plain[0] and spec.inv_freq()[-1] == pytest.approx(plain[-1] / 40.0)
    assert spec.softmax_scale(24) == pytest.approx(
        24**-0.5 * (0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1) ** 2
    )


# DeepSeek-V3's rope_scaling (config.json of deepseek-ai/DeepSeek-V3); mscale == mscale_all_dim, so
# cos/sin stay unscaled and the whole correction goes to the softmax scale
V3_ROPE = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}


def test_yarn_of_the_v3_release_config_matches_transformers() -> None:
    hf_cfg = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=64,
        max_position_embeddings=163840,
        rope_scaling=dict(V3_ROPE),
        rope_theta=10000,
    )
    hf_rotary = hf_v3.DeepseekV3RotaryEmbedding(hf_cfg)
    spec = RopeSpec.from_hf(64, 10000, V3_ROPE, 163840)
    rotary = Rotary(spec)
    torch.testing.assert_close(rotary.inv_freq, hf_rotary.inv_freq, atol=0, rtol=0)
    assert spec.cos_sin_scale == hf_rotary.attention_scaling == 1.0
    positions = torch.tensor([0, 1, 4095, 4096, 100_000, 163_839])
    cos, sin = rotary(positions)  # [P, 32]
    hf_cos, hf_sin = hf_rotary(torch.zeros(1), positions[None])  # [1, P, 64] = cat(freqs, freqs)
    torch.testing.assert_close(cos, hf_cos[0, :, :32], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, :32], atol=1e-6, rtol=0)
    hf_attn_scale = hf_v3.yarn_apply_mscale(hf_cfg.rope_parameters, 192**-0.5)
    assert spec.softmax_scale(192) == pytest.approx(hf_attn_scale, rel=1e-12) and hf_attn_scale > 192**-0.5
