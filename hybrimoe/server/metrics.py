"""Server counters rendered in the Prometheus text exposition format (version 0.0.4).

Server metrics are named `hybrimoe_server_*`. Every numeric key of `Engine.stats()` is exported as
`hybrimoe_<key>` (non-identifier characters become `_`), so values that the runtime adds later (cache
hit rate, bytes copied, busy seconds per device) appear without changes here: cumulative ones (by
their name: `is_cumulative`) as counters `hybrimoe_<key>_total`, the others as gauges.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hybrimoe.engine.types import GenerationResult

# Seconds; spans a tiny CPU model (milliseconds) to a large offloaded one (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Sequences per engine step (--max-batch up to a few hundred).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Histogram:
    """Cumulative-bucket histogram of observations (seconds)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS  # upper bounds (seconds, or sequences for batch sizes)
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, upper in enumerate(self.buckets) if value <= upper), len(self.buckets))
        self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for upper, n in zip(self.buckets, self.counts):
            running += n
            lines.append(f'{name}_bucket{{le="{upper}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.total)}")
        lines.append(f"{name}_count {self.count}")
        return lines


class ServerMetrics:
    """Thread-safe counters updated by the HTTP handlers and the engine worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, HTTP status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.decode_tokens = 0  # tokens after the first one of each request
        self.decode_seconds = 0.0
        self.last_decode_tokens_per_second = 0.0
        self.cancelled_requests = 0
        self.rejected_requests: dict[str, int] = {}  # reason (queue_full, ...) -> count
        self.max_queue: int | None = None
        self.max_batch: int | None = None
        self.engine_threads: int | None = None
        self.queue_depth = 0
        self.running = 0
        self.time_to_first_token = Histogram()
        self.queue_wait = Histogram()
        self.request_duration = Histogram()
        self.batch_size = Histogram(buckets=BATCH_BUCKETS)  # requests in the batch at each engine step

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.request_duration.observe(seconds)

    def queued(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta

    def started(self, waited_seconds: float) -> None:
        with self._lock:
            self.queue_wait.observe(waited_seconds)
            self.running += 1

    def batch_step(self, sequences: int) -> None:
        with self._lock:
            self.batch_size.observe(sequences)

    def first_token(self, seconds_since_arrival: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds_since_arrival)

    def ended(self, prompt_tokens: int, generated_tokens: int, result: GenerationResult | None) -> None:
        """A started request is over: finished with `result`, or cancelled / failed without one."""
        with self._lock:
            self.running -= 1
            if result is None:
                self.prompt_tokens += prompt_tokens
                self.generation_tokens += generated_tokens
                return
            self.prompt_tokens += result.prompt_tokens
            self.generation_tokens += result.completion_tokens
            if result.decode_seconds > 0 and result.completion_tokens > 1:
                self.decode_tokens += result.completion_tokens - 1
                self.decode_seconds += result.decode_seconds
                self.last_decode_tokens_per_second = result.decode_tokens_per_second

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected_requests[reason] = self.rejected_requests.get(reason, 0) + 1

    def cancelled(self) -> None:
        with self._lock:
            self.cancelled_requests += 1

    def render(self, engine_stats: dict[str, Any], model_name: str) -> str:
        """The whole exposition, server metrics first, then the engine's stats."""
        with self._lock:
            lines = [
                "# HELP hybrimoe_server_info Served model.",
                "# TYPE hybrimoe_server_info gauge",
                f'hybrimoe_server_info{{model="{_label(model_name)}"}} 1',
                "# HELP hybrimoe_server_requests_total HTTP requests by endpoint and status.",
                "# TYPE hybrimoe_server_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'hybrimoe_server_requests_total{{endpoint="{_label(endpoint)}",'
                             f'status="{status}"}} {n}')
            average = self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            lines += _scalar("hybrimoe_server_prompt_tokens_total", "counter",
                             "Prompt tokens processed.", self.prompt_tokens)
            lines += _scalar("hybrimoe_server_generation_tokens_total", "counter",
                             "Tokens generated.", self.generation_tokens)
            lines += _scalar("hybrimoe_server_decode_seconds_total", "counter",
                             "Seconds spent in decode steps.", self.decode_seconds)
            lines += _scalar("hybrimoe_server_decode_tokens_per_second", "gauge",
                             "Decode tokens/s of a request over all finished ones (batched requests decode at once: "
                             "the server's total is higher).", average)
            lines += _scalar("hybrimoe_server_last_decode_tokens_per_second", "gauge",
                             "Decode tokens/s of the last finished request.",
                             self.last_decode_tokens_per_second)
            lines += _scalar("hybrimoe_server_cancelled_requests_total", "counter",
                             "Requests abandoned by their client.", self.cancelled_requests)
            lines += _scalar("hybrimoe_server_queue_depth", "gauge",
                             "Requests waiting for the engine (being tokenised or queued).", self.queue_depth)
            if self.max_queue is not None:
                lines += _scalar("hybrimoe_server_max_queue", "gauge",
                                 "Waiting requests beyond which new ones get 429 (serve --max-queue).", self.max_queue)
            lines += ["# HELP hybrimoe_server_rejected_requests_total Requests refused before queueing, by reason.",
                      "# TYPE hybrimoe_server_rejected_requests_total counter"]
            for reason, n in sorted(self.rejected_requests.items()):
                lines.append(f'hybrimoe_server_rejected_requests_total{{reason="{_label(reason)}"}} {n}')
            if self.engine_threads is not None:
                lines += _scalar("hybrimoe_server_engine_threads", "gauge",
                                 "torch threads of the engine thread (serve --threads).", self.engine_threads)
            lines += _scalar("hybrimoe_server_running_requests", "gauge",
                             "Requests in the engine's batch (being prefilled or generated).", self.running)
            if self.max_batch is not None:
                lines += _scalar("hybrimoe_server_max_batch", "gauge",
                                 "Requests the engine steps together (serve --max-batch).", self.max_batch)
            lines += self.batch_size.render("hybrimoe_server_batch_size",
                                            "Requests in the batch at each engine step (mean = sum / count).")
            lines += self.time_to_first_token.render(
                "hybrimoe_server_time_to_first_token_seconds",
                "Seconds from request arrival to the first generated token.")
            lines += self.queue_wait.render("hybrimoe_server_queue_wait_seconds",
                                            "Seconds a request waited for the engine.")
            lines += self.request_duration.render("hybrimoe_server_request_duration_seconds",
                                                  "Seconds from request arrival to response end.")
        lines += render_engine_stats(engine_stats)
        return "\n".join(lines) + "\n"


CUMULATIVE_WORDS = frozenset({"seconds", "tokens", "copies", "copied", "requests", "hits", "misses", "inserts",
                              "staged", "evictions"})


def is_cumulative(name: str) -> bool:
    """Whether an engine stat only grows, judged by the words of its name (tokens, seconds, requests,
    cache hits / misses / copies...); rates, ratios and sizes (hit_rate, slots, resident) are current values."""
    words = set(name.lower().split("_"))
    return bool(words & CUMULATIVE_WORDS) and not words & {"rate", "ratio"}


def render_engine_stats(stats: dict[str, Any]) -> list[str]:
    """One series per numeric stat: counter `hybrimoe_<key>_total` if cumulative, else gauge
    `hybrimoe_<key>`; nested dicts are flattened with `_` ({"busy_seconds": {"gpu": 1.5}} ->
    hybrimoe_busy_seconds_gpu) and string values become labels of one `hybrimoe_engine_info` gauge.
    Other values (bools, lists, None) are skipped."""
    numbers: dict[str, float] = {}
    labels: dict[str, str] = {}
    keys: dict[str, str] = {}
    for key, value in _flatten(stats):
        name = re.sub(r"[^a-zA-Z0-9_]", "_", key).strip("_")
        if isinstance(value, str):
            labels[name if name[:1].isalpha() else "k_" + name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.setdefault("hybrimoe_" + name, value)
            keys.setdefault("hybrimoe_" + name, key)
    lines: list[str] = []
    if labels:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
        lines += ["# HELP hybrimoe_engine_info Engine settings.", "# TYPE hybrimoe_engine_info gauge",
                  f"hybrimoe_engine_info{{{text}}} 1"]
    for name, value in sorted(numbers.items()):
        if name.startswith(("hybrimoe_server_", "hybrimoe_engine_info")):
            continue
        key = _label(keys[name])
        if is_cumulative(name):
            lines += _scalar(name + "_total", "counter", f"Engine counter {key} (cumulative since start).", value)
        else:
            lines += _scalar(name, "gauge", f"Engine value {key} (current).", value)
    return lines


def _flatten(stats: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in stats.items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, dict):
            yield from _flatten(value, name)
        else:
            yield name, value


def _scalar(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
