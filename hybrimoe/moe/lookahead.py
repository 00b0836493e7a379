"""Runtime side of inter-layer prefetching (PAPER.md (ii)): predict the next layers' experts, let the
preset's Prefetcher (hybrimoe.policy.prefetch: impact | next-layer-score) pick what to copy.

Prediction, for the MoE layers after the current one (up to `depth`):
  gates  (real routing) the later layers' routers applied to the current layer's MoE input x [T, H]:
         the residual stream changes little between nearby layers, so their choice on x predicts
         their choice on their own input; counts per expert over the T tokens
  trace  (--replay-trace) the trace's routing of the same tokens at those layers: exact, an oracle;
         reported as such in `stats()["prefetch_prediction"]`
The link idle time offered to the prefetcher: (this layer's plan makespan - its copy finish) + the
measured time of the dense part before the next MoE layer (attention etc.; an EMA kept by the runtime).
When that window cannot hold one copy, nothing is predicted (no gate work, no planning: decode steps
stay cheap). The gates run before the layer's GPU experts are issued (`prepare`) and the prefetcher
picks after (`__call__`), waiting only for the gates' ids: no host sync on the layer's own GPU work.
On-demand copies were issued before, so a prefetch never delays them.
"""

from __future__ import annotations

from typing import Any

import torch

from hybrimoe.models.routing import route
from hybrimoe.policy.plan import ExpertKey, Plan
from hybrimoe.policy.prefetch import get_prefetcher


def _counts(ids: torch.Tensor) -> dict[int, int]:
    """expert_ids [T, K] -> {expert: tokens}."""
    return {e: n for e, n in enumerate(torch.bincount(ids.reshape(-1).to("cpu")).tolist()) if n}


class Lookahead:
    """Callable for `HybridRuntime.prefetcher`: (runtime, layer, x, plan, protect) -> keys to copy now."""

    def __init__(self, model: Any, prefetcher_name: str, depth: int = 3) -> None:
        assert depth >= 1, depth
        self.model = model
        self.prefetcher = get_prefetcher(prefetcher_name)
        self.depth = depth
        layers = sorted(model.moe_blocks)
        self.future = {layer: layers[i + 1:i + 1 + depth] for i, layer in enumerate(layers)}

    def prepare(self, runtime: Any, layer: int, x: torch.Tensor, plan: Plan) -> Any:
        """Called before the layer's GPU work is issued. None when the link's idle window cannot hold one
        copy (no gate work: decode steps stay cheap); else (idle seconds, expert ids [T, K] per later
        layer, event). The gates run now and their ids go to the host asynchronously; `__call__`, after
        the GPU work is issued, waits for that event only, never for the layer's own experts."""
        future = self.future.get(layer, [])
        if not future:
            return None
        idle = max(0.0, plan.makespan - plan.copy_finish) + runtime.dense_gap.get(future[0], 0.0)  # seconds
        if idle < runtime.costs(future[0]).copy():
            return None
        if runtime.replay is not None:
            return idle, {f: runtime.replay.peek(f, x.shape[0]) for f in future}, None
        ids = {}
        for f in future:
            gate = self.model.moe_blocks[f].gate
            chosen, _, _ = route(gate(x), self.model.config, gate.e_score_correction_bias)  # [T, K]
            ids[f] = chosen.to("cpu", non_blocking=True)
        return idle, ids, runtime.devices.record_main()

    def __call__(self, runtime: Any, layer: int, x: torch.Tensor, plan: Plan, protect: set[ExpertKey],
                 prepared: Any) -> tuple[list[ExpertKey], set[ExpertKey]]:
        """(keys to copy now in order, keys their admission must not evict: the predicted cached ones)."""
        if prepared is None:
            return [], set()
        idle, ids, event = prepared
        if event is not None:
            event.synchronize()  # the gates' expert ids are on the host
        predicted = {f: _counts(t) for f, t in ids.items()}
        scheduler = runtime.schedulers["prefill" if x.shape[0] > 1 else "decode"]
        state = runtime.cache.state
        keys = self.prefetcher.step(layer, predicted, state, idle, runtime.costs, scheduler, set(protect))
        keep = {(f, e) for f, counts in predicted.items() for e in counts if (f, e) in state}
        return keys, keep

    def describe(self, runtime: Any) -> str:
        return f"{self.prefetcher.name} prefetch, depth {self.depth}, predicted by " + \
            ("the replayed trace (oracle)" if runtime.replay is not None else "the later layers' gates")
