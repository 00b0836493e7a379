"""The Prometheus exposition of the server: valid text for any engine stats, histograms cumulative."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from hybrimoe.engine.types import GenerationResult
from hybrimoe.server.metrics import ServerMetrics


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_nested_and_odd_engine_stats_become_valid_gauges() -> None:
    stats = {"requests": 2, "decode_seconds": 0.5, "policy": "hybrimoe", "device": "cuda:0",
             "cache": {"hits": 30, "misses": 10, "hit_rate": 0.75}, "busy_seconds": {"cpu": 1.25, "gpu": 2.0},
             "bytes copied": 4096, "flag": True, "trace": None, "per_layer": [1, 2], "2nd": "x"}
    parsed = samples(ServerMetrics().render(stats, 'model "q"'))
    assert parsed[("hybrimoe_cache_hit_rate", frozenset())] == 0.75
    assert parsed[("hybrimoe_cache_hits_total", frozenset())] == 30
    assert parsed[("hybrimoe_busy_seconds_gpu_total", frozenset())] == 2.0
    assert parsed[("hybrimoe_bytes_copied_total", frozenset())] == 4096
    assert parsed[("hybrimoe_requests_total", frozenset())] == 2
    info = frozenset({"policy": "hybrimoe", "device": "cuda:0", "k_2nd": "x"}.items())
    assert parsed[("hybrimoe_engine_info", info)] == 1
    assert parsed[("hybrimoe_server_info", frozenset({"model": 'model "q"'}.items()))] == 1
    assert not any(name in ("hybrimoe_flag", "hybrimoe_trace", "hybrimoe_per_layer") for name, _ in parsed)


def test_cumulative_engine_stats_are_counters_and_the_rest_gauges() -> None:
    stats = {"requests": 3, "prompt_tokens": 40, "decode_seconds": 1.5, "runtime_cache_hits": 7.0,
             "runtime_cache_hit_rate": 0.5, "runtime_cache_slots": 12.0, "runtime_busy_cpu_seconds": 0.25}
    families = {f.name: f for f in text_string_to_metric_families(ServerMetrics().render(stats, "m"))}
    for name in ("requests", "prompt_tokens", "decode_seconds", "runtime_cache_hits", "runtime_busy_cpu_seconds"):
        family = families["hybrimoe_" + name]
        assert family.type == "counter" and "cumulative" in family.documentation, name
        assert [s.name for s in family.samples] == ["hybrimoe_" + name + "_total"]
    for name in ("runtime_cache_hit_rate", "runtime_cache_slots"):
        assert families["hybrimoe_" + name].type == "gauge", name
    assert "Engine stat." not in ServerMetrics().render(stats, "m")


def test_token_counters_histograms_and_decode_rate() -> None:
    metrics = ServerMetrics()
    for ttft, tokens in ((0.003, 5), (0.2, 9), (70.0, 1)):
        metrics.started(0.0)
        metrics.first_token(ttft)
        metrics.ended(4, tokens, GenerationResult(text="", token_ids=[], prompt_tokens=4, completion_tokens=tokens,
                                                  finish_reason="length", prefill_seconds=0.1,
                                                  decode_seconds=0.1 * (tokens - 1),
                                                  decode_tokens_per_second=10.0 if tokens > 1 else 0.0))
    metrics.started(0.0)
    metrics.ended(7, 3, None)  # cancelled after 3 tokens
    metrics.request_done("/v1/completions", 200, 0.5)
    parsed = samples(metrics.render({}, "m"))
    assert parsed[("hybrimoe_server_generation_tokens_total", frozenset())] == 5 + 9 + 1 + 3
    assert parsed[("hybrimoe_server_prompt_tokens_total", frozenset())] == 4 * 3 + 7
    assert parsed[("hybrimoe_server_running_requests", frozenset())] == 0
    assert abs(parsed[("hybrimoe_server_decode_tokens_per_second", frozenset())] - 10.0) < 1e-9
    bucket = {dict(labels)["le"]: v for (name, labels), v in parsed.items()
              if name == "hybrimoe_server_time_to_first_token_seconds_bucket"}
    assert (bucket["0.005"], bucket["0.25"], bucket["60.0"], bucket["+Inf"]) == (1, 2, 2, 3)
    assert parsed[("hybrimoe_server_requests_total",
                   frozenset({"endpoint": "/v1/completions", "status": "200"}.items()))] == 1


def test_request_counter_labels_an_unhandled_error_500_and_a_vanished_client_499() -> None:
    import asyncio

    from hybrimoe.server.middleware import RequestMetricsMiddleware

    async def failing(scope, receive, send) -> None:
        raise RuntimeError("bug in a handler")

    async def abandoned(scope, receive, send) -> None:
        raise asyncio.CancelledError()  # the server cancels a handler whose client left

    async def call(app) -> None:
        async def send(message) -> None:
            pass
        await RequestMetricsMiddleware(app, metrics, frozenset({"/v1/completions"}))(
            {"type": "http", "path": "/v1/completions"}, None, send)

    metrics = ServerMetrics()
    for app, error in ((failing, RuntimeError), (abandoned, asyncio.CancelledError)):
        try:
            asyncio.run(call(app))
        except error:
            pass
    assert metrics.requests == {("/v1/completions", 500): 1, ("/v1/completions", 499): 1}
