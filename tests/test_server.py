"""`hybrimoe serve` as a real subprocess on a tiny checkpoint, driven by the official `openai` client
(and raw httpx for malformed bodies): same text as `hybrimoe generate`, streaming and not, isolation
of concurrent clients, 4xx errors that leave the server serving, disconnects, Prometheus metrics."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerProcess, run_generate, start_server

FAMILY = "qwen3-moe"
BODY_LIMIT = 64 * 1024
CHAT_PROMPT = "What is the capital of France?"
TEXT_PROMPT = "The quick brown fox"
N = 12  # max_tokens of the comparisons
CONTEXT = 4096


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    # A long context, so that a request cut short by its client is far from done on any CPU.
    return tiny_checkpoint(FAMILY, overrides={"max_position_embeddings": CONTEXT})


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory) -> ServerProcess:
    proc = start_server(model_dir, tmp_path_factory.mktemp("serve") / "serve.log",
                        "--max-body-bytes", str(BODY_LIMIT))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    return model_dir.resolve().name


def stream_chat(client: openai.OpenAI, model: str, messages: list[dict], **kw) -> tuple[str, str, list]:
    """(text, finish_reason, chunks) of a streamed chat completion."""
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def stream_completion(client: openai.OpenAI, model: str, prompt: str, **kw) -> tuple[str, str, list]:
    chunks = list(client.completions.create(model=model, prompt=prompt, stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def metric_samples(server: ServerProcess) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_models_and_health(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    cards = client.models.list().data
    assert [c.id for c in cards] == [model]
    assert client.models.retrieve(model).id == model
    health = httpx.get(server.base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_matches_generate_streaming_and_not(client: openai.OpenAI, model: str, model_dir: Path) -> None:
    expected = run_generate(model_dir, CHAT_PROMPT, "--chat", "--temperature", "0", "--max-new-tokens", str(N))
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=N, temperature=0, stream=False)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].finish_reason == expected["finish_reason"]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == \
        (expected["prompt_tokens"], expected["completion_tokens"])
    assert whole.usage.total_tokens == expected["prompt_tokens"] + expected["completion_tokens"]

    text, finish, chunks = stream_chat(client, model, messages, max_tokens=N, temperature=0,
                                       stream_options={"include_usage": True})
    assert (text, finish) == (expected["text"], expected["finish_reason"])
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])

    parts = [{"type": "text", "text": CHAT_PROMPT[:10]}, {"type": "text", "text": CHAT_PROMPT[10:]}]
    from_parts = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                                max_tokens=N, temperature=0)
    assert from_parts.choices[0].message.content == expected["text"]


def test_completion_matches_generate_streaming_and_not(client: openai.OpenAI, model: str, model_dir: Path) -> None:
    expected = run_generate(model_dir, TEXT_PROMPT, "--temperature", "0", "--max-new-tokens", str(N))
    whole = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=N, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == expected["text"]
    assert whole.choices[0].finish_reason == expected["finish_reason"]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == \
        (expected["prompt_tokens"], expected["completion_tokens"])
    text, finish, chunks = stream_completion(client, model, TEXT_PROMPT, max_tokens=N, temperature=0)
    assert (text, finish) == (expected["text"], expected["finish_reason"])
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_seeded_sampling_matches_generate(client: openai.OpenAI, model: str, model_dir: Path) -> None:
    flags = ("--temperature", "0.9", "--top-p", "0.8", "--seed", "1234", "--max-new-tokens", str(N))
    expected = run_generate(model_dir, TEXT_PROMPT, *flags)
    kw = {"max_tokens": N, "temperature": 0.9, "top_p": 0.8, "seed": 1234}
    assert client.completions.create(model=model, prompt=TEXT_PROMPT, **kw).choices[0].text == expected["text"]
    assert stream_completion(client, model, TEXT_PROMPT, **kw)[0] == expected["text"]
    other = client.completions.create(model=model, prompt=TEXT_PROMPT, **{**kw, "seed": 99}).choices[0].text
    assert other != expected["text"]


def test_stop_strings_cut_the_text(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=16, temperature=0).choices[0].text
    middle = len(full) // 2
    stop = next(full[i:i + 2] for i in range(middle, len(full) - 1)
                if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    expected = full[:full.index(stop)]
    for stops in (stop, [stop, "zzz-never"]):
        whole = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=16, temperature=0, stop=stops)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    assert stream_completion(client, model, TEXT_PROMPT, max_tokens=16, temperature=0, stop=stop)[:2] == \
        (expected, "stop")


def test_concurrent_streaming_clients_get_their_own_output(client: openai.OpenAI, model: str) -> None:
    subjects = ["the sea", "a fox", "the sky", "France", "experts", "a zebra", "ten numbers", "the bus"]
    requests = [([{"role": "user", "content": f"Tell me about {s}."}], 4 + i) for i, s in enumerate(subjects)]
    alone = []
    for messages, max_tokens in requests:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        alone.append((r.choices[0].message.content, r.usage.completion_tokens))
    assert len({text for text, _ in alone}) == len(requests), "the requests must give different outputs"

    barrier = threading.Barrier(len(requests))
    together: list[tuple[str, int] | BaseException | None] = [None] * len(requests)

    def one(i: int) -> None:
        messages, max_tokens = requests[i]
        try:
            barrier.wait(30)
            text, _, chunks = stream_chat(client, model, messages, max_tokens=max_tokens, temperature=0,
                                          stream_options={"include_usage": True})
            together[i] = (text, chunks[-1].usage.completion_tokens)
        except BaseException as exc:  # reported by the main thread
            together[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone


def test_disconnect_mid_stream_frees_the_engine(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    before = metric_samples(server)
    long = CONTEXT - 100  # seconds of work: far more than is done before the server notices
    stream = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=long, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    after_stream = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=3, temperature=0)
    assert after_stream.usage.completion_tokens == 3

    # A non-streaming request whose client gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.api_url + "/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={"model": model, "prompt": TEXT_PROMPT, "max_tokens": long, "temperature": 0})
    after_post = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=3, temperature=0)
    assert after_post.usage.completion_tokens == 3

    after = metric_samples(server)
    assert value(after, "hybrimoe_server_cancelled_requests_total") - \
        value(before, "hybrimoe_server_cancelled_requests_total") == 2
    generated = value(after, "hybrimoe_server_generation_tokens_total") - \
        value(before, "hybrimoe_server_generation_tokens_total")
    assert 3 + 3 + 2 <= generated < 3 + 3 + 2 * long


def test_metrics_count_requests_tokens_and_engine_stats(server: ServerProcess, client: openai.OpenAI,
                                                        model: str) -> None:
    before = metric_samples(server)
    r = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=6, temperature=0)
    after = metric_samples(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("hybrimoe_server_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("hybrimoe_server_generation_tokens_total") == r.usage.completion_tokens
    assert delta("hybrimoe_server_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("hybrimoe_server_time_to_first_token_seconds_count") == 1
    assert delta("hybrimoe_server_time_to_first_token_seconds_sum") > 0
    assert value(after, "hybrimoe_server_decode_tokens_per_second") > 0
    assert value(after, "hybrimoe_server_info", model=model) == 1
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "hybrimoe_server_time_to_first_token_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1][1] == value(after, "hybrimoe_server_time_to_first_token_seconds_count")
    # Engine.stats() keys appear as hybrimoe_<key>; its counters moved with this request.
    engine = {k[0]: v for k, v in after.items() if not k[0].startswith("hybrimoe_server_")}
    assert engine, "no engine stats exported"
    assert any(v > before.get((name, frozenset()), 0.0) for name, v in engine.items())


def test_request_abandoned_while_queued_never_runs(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    before = metric_samples(server)
    running = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=CONTEXT - 100,
                                        temperature=0, stream=True)
    chunks = iter(running)
    next(chunks)  # the engine is busy with this one now
    with pytest.raises(httpx.ReadTimeout):  # queued behind it, then given up
        httpx.post(server.api_url + "/completions", timeout=httpx.Timeout(30, read=0.3),
                   json={"model": model, "prompt": "queued", "max_tokens": 5, "temperature": 0})
    running.close()
    after_both = client.completions.create(model=model, prompt=TEXT_PROMPT, max_tokens=3, temperature=0)
    assert after_both.usage.completion_tokens == 3
    after = metric_samples(server)
    assert value(after, "hybrimoe_server_cancelled_requests_total") - \
        value(before, "hybrimoe_server_cancelled_requests_total") == 2
    # Only the stream and the last request reached the engine.
    assert value(after, "hybrimoe_server_queue_wait_seconds_count") - \
        value(before, "hybrimoe_server_queue_wait_seconds_count") == 2
