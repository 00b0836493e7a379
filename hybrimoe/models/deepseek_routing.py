"""DeepSeek router variants: which experts each token uses, and with what weight.

T = tokens, E = routed experts, K = experts per token (top_k), G = expert groups (n_group).

- greedy (V2 / V2-Lite): s = softmax(logits); the K largest s; weight = s * routed_scaling_factor.
- group_limited_greedy (V2): as greedy, but first each group is scored by its best expert and only
  experts of the best `topk_group` groups may be chosen (others' scores masked to 0).
- noaux_tc (V3): s = sigmoid(logits); choice scores c = s + e_score_correction_bias; each group is
  scored by the sum of its two largest c; the K largest c within the best `topk_group` groups are
  chosen (others masked to -inf); weight = s (unbiased) of the chosen experts, divided by their sum
  when norm_topk_prob, then times routed_scaling_factor.

This follows transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter op for op (so ties break the
same way). Like transformers, the V2 router ignores `norm_topk_prob`: every released V2 checkpoint sets
it to false, where DeepSeek's original code also just scales by routed_scaling_factor.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hybrimoe.config import TOPK_METHODS
from hybrimoe.errors import ConfigError


class DeepseekRoutingConfig(Protocol):
    """The fields of ModelConfig that DeepSeek routing reads."""

    top_k: int
    topk_method: str
    n_group: int | None
    topk_group: int | None
    routed_scaling_factor: float
    norm_topk_prob: bool


def _group_mask(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int) -> torch.Tensor:
    """Bool [T, E]: experts that lie in the `topk_group` best groups (group_scores [T, G])."""
    t, g = group_scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    per_group = choice.shape[-1] // g
    return group_mask.unsqueeze(-1).expand(t, g, per_group).reshape(t, -1).bool()


def _groups(config: DeepseekRoutingConfig, num_experts: int) -> tuple[int, int]:
    n_group, topk_group = config.n_group or 1, config.topk_group or 1
    if num_experts % n_group != 0 or not 1 <= topk_group <= n_group:
        raise ConfigError(
            f"{num_experts} experts cannot be split into n_group={n_group} groups with topk_group={topk_group}"
        )
    return n_group, topk_group


def route_deepseek(
    logits: torch.Tensor,
    config: DeepseekRoutingConfig,
    e_score_correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route router logits float32 [T, E] (= x @ gate.weight.T, in float32).

    Returns (expert_ids long [T, K], weights float32 [T, K], scores float32 [T, E]), where `scores`
    is the full unbiased score vector (softmax for V2, sigmoid for V3). Expert ids within a row are
    in torch.topk(sorted=False) order, as in transformers.
    """
    logits = logits.to(torch.float32)
    num_experts, k = logits.shape[-1], config.top_k
    method = config.topk_method
    if method in ("greedy", "group_limited_greedy"):
        scores = logits.softmax(dim=-1, dtype=torch.float32)  # [T, E]
        choice = scores
        if method == "group_limited_greedy":
            n_group, topk_group = _groups(config, num_experts)
            group_scores = scores.view(-1, n_group, num_experts // n_group).max(dim=-1).values  # [T, G]
            choice = scores.masked_fill(~_group_mask(scores, group_scores, topk_group), 0.0)
        weights, expert_ids = torch.topk(choice, k=k, dim=-1, sorted=False)  # [T, K]
        return expert_ids, weights * config.routed_scaling_factor, scores
    if method == "noaux_tc":
        n_group, topk_group = _groups(config, num_experts)
        scores = logits.sigmoid()  # [T, E]
        choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias.to(scores)
        group_scores = (
            choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        )  # [T, G]
        choice = choice.masked_fill(~_group_mask(choice, group_scores, topk_group), float("-inf"))
        expert_ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, expert_ids)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, weights * config.routed_scaling_factor, scores
    raise ConfigError(f"unknown DeepSeek topk_method {method!r}; supported: {', '.join(TOPK_METHODS)}")
