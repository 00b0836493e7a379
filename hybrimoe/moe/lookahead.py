"""Runtime side of inter-layer prefetching (PAPER.md (ii)): predict the next layers' experts; the copy
pipeline (hybrimoe.policy.pipeline, the same object the simulator drives) decides what to copy.

Prediction, for the MoE layers after the current one (up to `depth`):
  gates  (real routing) the later layers' routers applied to the current layer's MoE input x [T, H]:
         the residual stream changes little between nearby layers, so their choice on x predicts
         their choice on their own input; counts per expert over the T tokens
  trace  (--replay-trace) the trace's routing of the same tokens at those layers: exact, an oracle;
         reported as such in `stats()["prefetch"]`
When no copy could start before the next MoE layer (the link is booked past this layer's predicted
end + the measured dense gap), nothing is predicted (no gate work: decode steps stay cheap). The gates
run before the layer's GPU experts are issued (`prepare`); `predicted` waits only for the gates' ids
(an event), never for the layer's own GPU work.
"""

from __future__ import annotations

from typing import Any

import torch

from hybrimoe.models.routing import route
from hybrimoe.policy.plan import Plan


def _counts(ids: torch.Tensor) -> dict[int, int]:
    """expert_ids [T, K] -> {expert: tokens}."""
    return {e: n for e, n in enumerate(torch.bincount(ids.reshape(-1).to("cpu")).tolist()) if n}


class Lookahead:
    """The runtime's predictor of later layers' routing (gates, or the replayed trace)."""

    def __init__(self, model: Any, depth: int = 3) -> None:
        assert depth >= 1, depth
        self.model = model
        self.depth = depth

    def prepare(self, runtime: Any, layer: int, x: torch.Tensor, plan: Plan, now: float) -> Any:
        """Called before the layer's GPU work is issued. None when no copy could start before the next
        MoE layer (no gate work); else (expert ids [T, K] per later layer, event or None)."""
        pipeline = runtime.pipeline
        future = pipeline.future(layer)
        if not future:
            return None
        window_end = pipeline.next_layer_start(now, plan, runtime.dense_gap.get(future[0], 0.0))
        if pipeline.link.start_of_next(now) >= window_end:
            return None
        if runtime.replay is not None:
            return {f: runtime.replay.peek(f, x.shape[0]) for f in future}, None
        ids = {}
        for f in future:
            gate = self.model.moe_blocks[f].gate
            chosen, _, _ = route(gate(x), self.model.config, gate.e_score_correction_bias)  # [T, K]
            ids[f] = chosen.to("cpu", non_blocking=True)
        return ids, runtime.devices.record_main()

    @staticmethod
    def predicted(prepared: Any) -> dict[int, dict[int, int]]:
        """{later layer: {expert: tokens}} from `prepare`'s result ({} for None)."""
        if prepared is None:
            return {}
        ids, event = prepared
        if event is not None:
            event.synchronize()  # the gates' expert ids are on the host
        return {f: _counts(t) for f, t in ids.items()}

    def describe(self, runtime: Any) -> str:
        return f"{runtime.pipeline.prefetcher.name} prefetch, depth {self.depth}, predicted by " + \
            ("the replayed trace (oracle)" if runtime.replay is not None else "the later layers' gates")
