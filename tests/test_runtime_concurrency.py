"""Hybrid runtime concurrency on the CPU fallback: every slot read waits for its copy event (fake CUDA
events), the CPU worker's own thread count and its error paths, the default worker size."""

from __future__ import annotations

import threading

import pytest
import torch

from hybrimoe.moe.devices import Devices, HostTimer
from hybrimoe.moe.install import install_runtime
from hybrimoe.moe.runtime import CpuWorker
from hybrimoe.runtime_options import RuntimeOptions
from test_runtime import COSTS, _run_steps, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def test_cpu_worker_has_its_own_thread_count() -> None:
    main_before = torch.get_num_threads()
    worker = CpuWorker(threads=3)
    try:
        assert worker.submit(torch.get_num_threads).result() == 3
        assert torch.get_num_threads() == main_before
        other = []
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert other == [main_before]  # new threads keep the process default
    finally:
        worker.close()


class EventDevices(Devices):
    """CPU fallback whose copies return event tokens, so the stream discipline of the CUDA path can be
    checked here: the main stream must wait for an expert's copy before reading its slot."""

    class Event:
        def synchronize(self) -> None:
            pass

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), None, HostTimer(), HostTimer())
        self.waited: set[int] = set()  # copy events the main stream waited for
        self.copy_waited: set[int] = set()  # main-stream events the copy stream waited for
        self.main_events: list = []
        self.copy_events: list = []

    def record_copy(self):
        self.copy_events.append(self.Event())
        return self.copy_events[-1]

    def record_main(self):
        self.main_events.append(self.Event())
        return self.main_events[-1]

    def main_waits(self, event) -> None:
        if event is not None:
            self.waited.add(id(event))

    def copy_waits(self, event) -> None:
        if event is not None:
            self.copy_waited.add(id(event))


@pytest.mark.parametrize("policy,ratio", [("gpu-lru", 0.25), ("hybrimoe", 0.25), ("hybrimoe-cache-only", 0.25),
                                          ("hybrimoe", 0.0)])
def test_every_slot_read_waits_for_its_copy_event(policy: str, ratio: float) -> None:
    """... and every read of a prefetch staging buffer (hybrimoe with no cache: prefetches only stage)."""
    model = tiny()
    runtime = install_runtime(model, RuntimeOptions(policy=policy, cache_ratio=ratio, cpu_threads=1), costs=COSTS)
    devices = EventDevices()
    runtime.devices = runtime.cache.devices = devices
    cache = runtime.cache
    last_copy: dict = {}
    reads = {"checked": 0}
    copy_into_slot, weights = cache.copy_into_slot, cache.weights
    stage, staged_weights = cache.stage, cache.staged_weights
    staged_copy: dict = {}

    def recording_copy(key, slot=None):
        event = copy_into_slot(key, slot)
        last_copy[key] = event
        return event

    def checked_weights(key):
        if key in last_copy:
            assert id(last_copy[key]) in devices.waited, f"slot of {key} read before its copy event was waited for"
            reads["checked"] += 1
        return weights(key)

    def recording_stage(key):  # a prefetch into a staging buffer: its copy event must be waited for too
        buffer = stage(key)
        staged_copy[key] = devices.copy_events[-1]
        return buffer

    def checked_staged_weights(key):
        found = staged_weights(key)
        if found is not None:
            assert id(staged_copy[key]) in devices.waited, f"staging buffer of {key} read before its copy event"
            reads["prefetch_staged"] = reads.get("prefetch_staged", 0) + 1
        return found

    released: dict[int, object] = {}  # staging buffer -> main-stream event after its last reader
    staging_buffer, release_staging = cache.staging_buffer, cache.release_staging

    def checked_staging(layer):
        buffer = staging_buffer(layer)
        previous = released.get(id(buffer))
        assert previous is None or id(previous) in devices.copy_waited, "staging buffer refilled while still read"
        reads["staged"] = reads.get("staged", 0) + 1
        return buffer

    def recording_release(buffer):
        release_staging(buffer)
        released[id(buffer)] = devices.main_events[-1]

    cache.copy_into_slot, cache.weights = recording_copy, checked_weights
    cache.stage, cache.staged_weights = recording_stage, checked_staged_weights
    cache.staging_buffer, cache.release_staging = checked_staging, recording_release
    try:
        _run_steps(model, steps=8)
    finally:
        runtime.close()
    if ratio == 0.0:
        assert reads.get("prefetch_staged", 0) > 0 and not last_copy
        return
    assert reads["checked"] > 0 and last_copy
    if policy == "gpu-lru":  # prompt copies beyond the free slots go through the two staging buffers
        assert reads["staged"] > 2


def test_worker_errors_reach_the_caller_and_main_side_errors_wait_for_the_worker(monkeypatch) -> None:
    """fiddler with an empty cache runs these 3 tokens' experts on the CPU worker (see the first test)."""
    import time

    model = tiny()
    layer = model.config.moe_layers[0]
    x, ids = torch.randn(3, model.config.hidden_size), torch.tensor([[5, 1, 6, 2], [2, 7, 5, 0], [3, 5, 1, 4]])
    w = torch.full((3, 4), 0.25)
    runtime = install_runtime(model, RuntimeOptions(policy="fiddler", cache_ratio=0.0, cpu_threads=1), costs=COSTS)
    executor = runtime.executor
    cpu_part = executor._cpu_part
    try:
        def failing(*args):
            raise RuntimeError("worker failed")

        monkeypatch.setattr(executor, "_cpu_part", failing)
        with pytest.raises(RuntimeError, match="worker failed"):
            executor.run(layer, x, ids, w)
        started, finished = threading.Event(), []

        def slow(*args):
            started.set()
            time.sleep(0.2)
            out = cpu_part(*args)
            finished.append(True)
            return out

        def main_fails(*args):
            assert started.wait(10)  # the worker runs the layer's CPU part when the main side fails
            raise RuntimeError("main side failed")

        monkeypatch.setattr(executor, "_cpu_part", slow)
        monkeypatch.setattr(runtime, "prepare_copies", main_fails)
        with pytest.raises(RuntimeError, match="main side failed"):
            executor.run(layer, x, ids, w)
        assert finished == [True]  # the layer's CPU work was over before the error reached the caller
    finally:
        runtime.close()


def test_default_cpu_threads_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch) -> None:
    import os

    from hybrimoe.moe import runtime as rt

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(rt, "CGROUP_CPU_MAX", str(tmp_path / "absent"))
    assert rt.usable_cores() == 64 and rt.default_cpu_threads() == 63
    quota = tmp_path / "cpu.max"
    quota.write_text("1600000 100000\n")  # a 16-core container on a 64-core host
    monkeypatch.setattr(rt, "CGROUP_CPU_MAX", str(quota))
    assert rt.usable_cores() == 16 and rt.default_cpu_threads() == 15
    quota.write_text("max 100000\n")
    assert rt.usable_cores() == 64
