"""MoE layer mechanics: expert weight store, routing records, executors."""

from hybrimoe.moe.layer import (Executor, MoEBlock, ReferenceExecutor, RoutingObserver, RoutingRecord,
                                expert_forward, group_by_expert)
from hybrimoe.moe.store import ExpertStore, ExpertWeights, split_expert

__all__ = ["Executor", "ExpertStore", "ExpertWeights", "MoEBlock", "ReferenceExecutor", "RoutingObserver",
           "RoutingRecord", "expert_forward", "group_by_expert", "split_expert"]
