"""Devices of the hybrid runtime: the compute device, its copy stream, events and busy-time timers.

On CUDA: expert compute runs on the current (main) stream, host->device copies of expert weights on a
dedicated copy stream; a copy's completion is an event the main stream waits on before using the slot.
Busy time is measured with pairs of CUDA events on each stream, resolved lazily (no sync per layer).

Without CUDA the "GPU" is the CPU device and the same calls are made: streams are None, a copy is a
synchronous host copy, events are already complete, and busy time comes from time.perf_counter.
So the CPU tests run the very code path the GPU runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class HostTimer:
    """Busy seconds of work done by host threads (perf_counter spans). Thread-safe."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._lock = threading.Lock()
        self._start: float | None = None

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(time.perf_counter() - start)

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.add(time.perf_counter() - self._start)
            self._start = None

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds += seconds

    def seconds(self) -> float:
        with self._lock:
            return self._seconds

    def reset(self) -> None:
        with self._lock:
            self._seconds = 0.0


class CudaTimer:
    """Busy seconds of one CUDA stream: sum of (start, end) event pairs recorded on that stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._pending: list[tuple[Any, Any]] = []
        self._open: Any = None
        self._seconds = 0.0

    def start(self) -> None:
        # a span left open by an exception is dropped, not counted
        self._open = torch.cuda.Event(enable_timing=True)
        self._open.record(self.stream)

    def stop(self) -> None:
        if self._open is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self._pending.append((self._open, end))
        self._open = None
        if len(self._pending) > 4096:  # bound the number of live events without a sync in the hot path
            self._resolve(wait=False)

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    def _resolve(self, wait: bool = True) -> None:
        """Adds the finished spans; `wait`: waits for the unfinished ones too, else keeps them pending."""
        left = []
        for start, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                left.append((start, end))
                continue
            self._seconds += start.elapsed_time(end) / 1000.0  # elapsed_time is in ms
        self._pending = left

    def seconds(self) -> float:
        self._resolve()
        return self._seconds

    def reset(self) -> None:
        self._resolve()
        self._seconds = 0.0


@dataclass
class Devices:
    """The compute device ("GPU", CUDA or CPU fallback), the copy stream and the three busy timers."""

    compute: torch.device
    copy_stream: Any = None  # torch.cuda.Stream on CUDA, None on the CPU fallback
    gpu_timer: Any = field(default=None)  # busy time of expert compute on the main stream
    copy_timer: Any = field(default=None)  # busy time of the copy link
    cpu_timer: HostTimer = field(default_factory=HostTimer)  # busy time of the CPU expert worker

    @classmethod
    def create(cls, device: str | torch.device) -> Devices:
        compute = torch.device(device)
        if compute.type == "cuda":
            if compute.index is None:
                compute = torch.device("cuda", torch.cuda.current_device())
            with torch.cuda.device(compute):
                copy_stream = torch.cuda.Stream(device=compute)
                main = torch.cuda.current_stream(compute)
            return cls(compute, copy_stream, CudaTimer(main), CudaTimer(copy_stream))
        return cls(compute, None, HostTimer(), HostTimer())

    @property
    def is_cuda(self) -> bool:
        return self.compute.type == "cuda"

    def copy_context(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which copies are issued: the copy stream on CUDA, a no-op otherwise."""
        return torch.cuda.stream(self.copy_stream) if self.is_cuda else contextlib.nullcontext()

    def copy_waits_for_main(self) -> None:
        """Order later copies after all work issued so far on the main stream (slot reuse safety)."""
        if self.is_cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.compute))

    def record_copy(self) -> Any:
        """Event marking the end of the copies issued so far on the copy stream (None off CUDA)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    def record_main(self) -> Any:
        """Event marking the end of work issued so far on the main stream (None off CUDA)."""
        if not self.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.compute))
        return event

    def main_waits(self, event: Any) -> None:
        """The main stream waits for `event` (a finished copy) before later work; no-op off CUDA."""
        if event is not None:
            torch.cuda.current_stream(self.compute).wait_event(event)

    def copy_waits(self, event: Any) -> None:
        """The copy stream waits for `event` (main stream done with a slot); no-op off CUDA."""
        if event is not None:
            self.copy_stream.wait_event(event)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.compute)

    def busy_seconds(self) -> dict[str, float]:
        """Measured busy time so far: {'cpu': s, 'gpu': s, 'copy': s} (synchronises on CUDA)."""
        return {"cpu": self.cpu_timer.seconds(), "gpu": self.gpu_timer.seconds(), "copy": self.copy_timer.seconds()}

    def reset_timers(self) -> None:
        for timer in (self.cpu_timer, self.gpu_timer, self.copy_timer):
            timer.reset()
