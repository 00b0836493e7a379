"""DeepSeek routers against transformers: greedy, group-limited greedy (V2) and noaux_tc (V3), alone on
random logits and inside the whole model (each RoutingRecord equals transformers' gate decisions)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from hybrimoe.config import ModelConfig
from hybrimoe.loader import load_model
from hybrimoe.models.routing import route

ROUTER_CASES = {
    "greedy": dict(
        family="v2",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    ),
    # transformers' V2 router never renormalises, whatever norm_topk_prob says
    "greedy_norm_flag_ignored": dict(
        family="v2",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
    ),
    "group_limited_greedy": dict(
        family="v2",
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=16.0,
        norm_topk_prob=False,
    ),
    "noaux_tc": dict(
        family="v3",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "noaux_tc_unnormalised": dict(
        family="v3",
        topk_method="noaux_tc",
        n_group=8,
        topk_group=3,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    ),
}


@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_routing_matches_transformers(case: str) -> None:
    params = dict(ROUTER_CASES[case])
    family = params.pop("family")
    torch.manual_seed(1)
    n_experts, top_k, hidden, tokens = 32, 6, 24, 64
    common = dict(
        hidden_size=hidden,
        num_attention_heads=4,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        **params,
    )
    if family == "v2":
        hf_cfg = DeepseekV2Config(**common)
        gate = hf_v2.DeepseekV2TopkRouter(hf_cfg)
    else:
        hf_cfg = DeepseekV3Config(**common)
        gate = hf_v3.DeepseekV3TopkRouter(hf_cfg)
    config = ModelConfig.from_dict(hf_cfg.to_dict())
    assert config.topk_method == params["topk_method"]
    bias = None
    with torch.no_grad():
        gate.weight.normal_()
        if family == "v3":
            bias = torch.randn(n_experts) * 0.5  # large enough to change choices
            gate.e_score_correction_bias.copy_(bias)
        x = torch.randn(tokens, hidden)
        x[1] = x[0]  # a repeated token routes identically
        logits, want_w, want_ids = gate(x)
    ids, weights, scores = route(logits, config, bias)  # the model's router entry point
    assert ids.dtype == torch.long and ids.shape == (tokens, top_k) and weights.dtype == torch.float32
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-6)
    expected_scores = logits.softmax(-1) if family == "v2" else logits.sigmoid()
    torch.testing.assert_close(scores, expected_scores)
    if family == "v3":  # the bias steers the choice: it differs from the plain top-k of the scores
        plain = scores.topk(top_k, dim=-1).indices.sort(-1).values
        assert not torch.equal(plain, ids.sort(-1).values)
        if params["norm_topk_prob"]:
            torch.testing.assert_close(weights.sum(-1), torch.full((tokens,), 2.5))
    if params["n_group"] > 1:  # every chosen expert lies in at most topk_group groups
        groups = ids // (n_experts // params["n_group"])
        assert all(len(set(row.tolist())) <= params["topk_group"] for row in groups)


@pytest.mark.parametrize(
    "family,overrides",
    [("deepseek-v2", {}), ("deepseek-v2-lite", {"norm_topk_prob": True}), ("deepseek-v3", {})],
)
def test_routing_records_equal_transformers_gate_decisions(
    tiny_checkpoint, family: str, overrides: dict
) -> None:
    """In the whole model, each MoE layer's RoutingRecord holds transformers' gate decisions."""
    path = tiny_checkpoint(family, overrides=overrides) if overrides else tiny_checkpoint(family)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = load_model(path, progress=False)
    hf_gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(ref.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda m, args, out, i=i: hf_gates.__setitem__(i, (out[2], out[1]))
            )
    records = {}
    model.routing_observer = lambda layer, rec: records.__setitem__(layer, rec)
    ids = torch.randint(3, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref(ids[None])
    model(ids, 0, model.new_kv_cache(16))
    assert set(records) == set(hf_gates) == set(model.config.moe_layers) and records
    for layer, rec in records.items():
        want_ids, want_w = hf_gates[layer]
        torch.testing.assert_close(rec.expert_ids, want_ids, atol=0, rtol=0)
        torch.testing.assert_close(rec.weights, want_w, atol=1e-5, rtol=1e-5)
        if family == "deepseek-v3":  # sigmoid scores, unbiased
            assert (rec.scores > 0).all() and (rec.scores < 1).all()
            assert not torch.allclose(rec.scores.sum(-1), torch.ones(16))
        else:
            torch.testing.assert_close(rec.scores.sum(-1), torch.ones(16))
