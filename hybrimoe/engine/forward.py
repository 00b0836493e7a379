"""One forward pass of the engine's model over one or several sequences, with the routing recorder.

`forward_segments(engine, segments)` runs `model.forward_batch` and returns each segment's last-token
logits; while a `RoutingRecorder` is attached to the engine it brackets the pass (`begin_batch` /
`end_step`) and sees every MoE layer's routing through the model's `routing_observer`, chained with an
observer already installed (the hybrid runtime's cache policy keeps observing router scores).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Segment:
    """One sequence's share of a forward: `ids` at positions start_pos.. of its own `kv` cache."""

    key: Hashable  # the recorder's sequence key (request id; None for Engine.stream's single sequence)
    ids: list[int]
    start_pos: int
    kv: Any  # KVCache
    phase: str  # "prefill" (prompt tokens) | "decode"


def forward_segments(engine: Any, segments: list[Segment]) -> torch.Tensor:
    """Logits [S, V] (fp32) of each segment's last token. The step counts as prefill for the hybrid
    runtime when any segment carries prompt tokens."""
    device = engine.options.device
    batch = [(torch.tensor(s.ids, dtype=torch.long, device=device), s.start_pos, s.kv) for s in segments]
    prefill = any(s.phase == "prefill" for s in segments)
    model, recorder = engine.model, engine.recorder
    if recorder is None:
        return model.forward_batch(batch, prefill=prefill)
    previous = model.routing_observer
    recorder.begin_batch([(s.key, s.phase, s.start_pos, s.ids) for s in segments])
    if previous is None:
        model.routing_observer = recorder.observe
    else:
        def observe_both(layer: int, record: Any) -> None:
            recorder.observe(layer, record)
            previous(layer, record)
        model.routing_observer = observe_both
    try:
        logits = model.forward_batch(batch, prefill=prefill)
    except BaseException:
        recorder.cancel_step()
        raise
    finally:
        model.routing_observer = previous
    recorder.end_step()
    return logits
