"""Router: gate logits -> (experts used per token, their combine weights, full score vector).

Softmax top-k (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 "greedy") is here; DeepSeek's group-limited
and sigmoid + correction-bias routers live in `hybrimoe.models.deepseek_routing`.
Shapes: T = tokens, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import torch

from hybrimoe.config import ModelConfig


def route(logits: torch.Tensor, config: ModelConfig,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] -> expert_ids [T, K] long, weights [T, K] fp32, scores [T, E] fp32.

    softmax top-k: scores = softmax(logits); the K largest are used, weights = their scores,
    renormalised to sum 1 when `norm_topk_prob`, then times `routed_scaling_factor`.
    `bias` is DeepSeek-V3's e_score_correction_bias [E] (only used by the DeepSeek routers).
    """
    if config.uses_deepseek_router:
        from hybrimoe.models.deepseek_routing import route_deepseek
        return route_deepseek(logits, config, bias)
    scores = torch.softmax(logits.float(), dim=-1)                       # [T, E]
    weights, expert_ids = torch.topk(scores, config.top_k, dim=-1)     # [T, K]
    if config.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return expert_ids, weights, scores
