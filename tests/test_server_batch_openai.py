"""`hybrimoe serve --max-batch 8` as a real subprocess on a tiny Mixtral checkpoint, driven by the
official `openai` client: 8 concurrent streams (prompts of different lengths, greedy and seeded
sampling, joining and leaving mid-stream) each give exactly their solo run's text (the plain
`Engine.generate`, fp32); a request joins a running batch (done before the earlier long one ends);
a stream cancelled by its client leaves the others intact; a bad request while others run is a 400
that touches nobody else."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
from server_utils import ServerProcess, start_server
from test_server import metric_samples, value

from hybrimoe.engine import Engine
from hybrimoe.engine.types import SamplingParams

CONTEXT = 1024
MAX_BATCH = 8
WORDS = ("experts route every token to a few of many while the card holds the hot ones and the "
         "processor runs the rest ").split()


def prompt_of(i: int) -> str:
    """Prompt i: 3 to ~150 words, each different."""
    n = 3 + (i * 37) % 150
    return f"Request {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def sampling_of(i: int, max_tokens: int) -> dict:
    """Even requests greedy, odd ones seeded sampling."""
    if i % 2 == 0:
        return {"max_tokens": max_tokens, "temperature": 0}
    return {"max_tokens": max_tokens, "temperature": 0.9, "top_p": 0.9, "seed": 1000 + i}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mixtral", overrides={"max_position_embeddings": CONTEXT})


@pytest.fixture(scope="module")
def solo(model_dir: Path):
    """solo(prompt, **kw) -> (text, completion tokens) of the request run alone by the plain engine."""
    engine = Engine.from_pretrained(model_dir, dtype="fp32")

    def run(prompt: str, max_tokens: int, temperature: float, top_p: float = 1.0, seed: int | None = None):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        result = engine.generate(engine.encode(prompt), params)
        return result.text, result.completion_tokens

    return run


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory) -> ServerProcess:
    proc = start_server(model_dir, tmp_path_factory.mktemp("serve") / "serve.log", "--max-batch", str(MAX_BATCH))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    return model_dir.resolve().name


class Stream(threading.Thread):
    """One streamed completion on its own thread: `first` is set at its first text chunk; `text`,
    `tokens` (usage) and `finished_at` once it ends; `error` if it raised."""

    def __init__(self, client: openai.OpenAI, model: str, prompt: str, kw: dict, stop_after: int | None = None):
        super().__init__(daemon=True)
        self.client, self.model, self.prompt, self.kw, self.stop_after = client, model, prompt, kw, stop_after
        self.first = threading.Event()
        self.text, self.tokens, self.chunks = "", None, 0
        self.finished_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.completions.create(model=self.model, prompt=self.prompt, stream=True,
                                                    stream_options={"include_usage": True}, **self.kw)
            for chunk in stream:
                if chunk.usage is not None:
                    self.tokens = chunk.usage.completion_tokens
                if chunk.choices:
                    self.text += chunk.choices[0].text
                    self.chunks += 1
                    self.first.set()
                if self.stop_after is not None and self.chunks >= self.stop_after:
                    stream.close()  # the client goes away mid-stream
                    break
            self.finished_at = time.monotonic()
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.first.set()


def wait_all(streams: list[Stream]) -> None:
    for s in streams:
        s.join(300)
        assert not s.is_alive(), "a stream did not end"
        assert s.error is None, s.error


def test_eight_concurrent_streams_each_give_their_solo_text(server, client, model, solo) -> None:
    before = metric_samples(server)
    requests = [(prompt_of(i), sampling_of(i, 6 + 5 * i)) for i in range(MAX_BATCH)]
    expected = [solo(p, **kw) for p, kw in requests]
    assert len({text for text, _ in expected}) == MAX_BATCH, "the requests must give different outputs"
    streams = [Stream(client, model, p, kw) for p, kw in requests]
    for s in streams[:4]:  # four start together; the other four join them mid-stream
        s.start()
    for s in streams[:4]:
        assert s.first.wait(120)
    for s in streams[4:]:
        s.start()
    wait_all(streams)
    assert [(s.text, s.tokens) for s in streams] == expected
    after = metric_samples(server)
    steps = value(after, "hybrimoe_server_batch_size_count") - value(before, "hybrimoe_server_batch_size_count")
    sequences = value(after, "hybrimoe_server_batch_size_sum") - value(before, "hybrimoe_server_batch_size_sum")
    assert sequences / steps > 2, (sequences, steps)  # mean requests per step: they ran together
    assert value(after, "hybrimoe_server_max_batch") == MAX_BATCH
    assert value(after, "hybrimoe_server_running_requests") == 0


def test_a_request_joins_the_running_batch(client, model, solo) -> None:
    long_kw = sampling_of(0, 600)
    long = Stream(client, model, prompt_of(20), long_kw)
    long.start()
    assert long.first.wait(120)
    short_kw = sampling_of(1, 3)
    short = client.completions.create(model=model, prompt=prompt_of(21), **short_kw)
    short_done = time.monotonic()
    wait_all([long])
    assert long.finished_at > short_done  # served while the long one still ran, not after it
    assert (short.choices[0].text, short.usage.completion_tokens) == solo(prompt_of(21), **short_kw)
    assert (long.text, long.tokens) == solo(prompt_of(20), **long_kw)


def test_a_cancelled_stream_leaves_the_others_intact(server, client, model, solo) -> None:
    before = metric_samples(server)
    requests = [(prompt_of(30 + i), sampling_of(i, 60)) for i in range(3)]
    streams = [Stream(client, model, p, kw, stop_after=2 if i == 1 else None) for i, (p, kw) in enumerate(requests)]
    for s in streams:
        s.start()
    wait_all(streams)
    for i in (0, 2):
        assert (streams[i].text, streams[i].tokens) == solo(*requests[i][:1], **requests[i][1])
    assert streams[1].chunks == 2
    deadline = time.monotonic() + 30
    while True:  # the server notices the disconnect at its next write
        after = metric_samples(server)
        if value(after, "hybrimoe_server_running_requests") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert value(after, "hybrimoe_server_cancelled_requests_total") - \
        value(before, "hybrimoe_server_cancelled_requests_total") == 1
    assert value(after, "hybrimoe_server_running_requests") == 0


def test_a_bad_request_while_others_run_is_refused_alone(client, model, solo) -> None:
    requests = [(prompt_of(40 + i), sampling_of(i, 80)) for i in range(2)]
    streams = [Stream(client, model, p, kw) for p, kw in requests]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first.wait(120)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model, prompt="hello", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model, prompt=" ".join(["experts"] * 2 * CONTEXT), max_tokens=4)
    wait_all(streams)
    for s, (prompt, kw) in zip(streams, requests):
        assert (s.text, s.tokens) == solo(prompt, **kw)
