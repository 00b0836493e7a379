"""The engine thread stepping a batch, in process, over a real Engine (fake model) behind the
RoundRobinBatch stand-in (tests/batch_fakes.py): each request gets exactly its solo tokens while
others join and leave; a request joins a running batch (its first token before the earlier long
request ends); cancelling one request frees that one only; a request refused by its checks fails
alone; a step that fails as a whole fails the requests in it and a fresh batch serves the next;
shutdown ends every running request after its grace (the option and the KV check: test_server_batch_options.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from batch_fakes import RoundRobinBatch
from server_fakes import fake_engine, openai_client, served

from hybrimoe.engine.types import SamplingParams
from hybrimoe.server.metrics import ServerMetrics
from hybrimoe.server.worker import EngineWorker, Failed, Finished, Started

TIMEOUT = 10.0
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 0.9, "top_p": 0.9, "seed": 7}
TEXTS = ["hello world", "the quick brown fox jumps over", "numbers 0123", "café naïve façade and more words"]


def solo(prompt: list[int], params: SamplingParams) -> list[int]:
    """The request's tokens when it runs alone, on an engine of its own."""
    return fake_engine().generate(prompt, params).token_ids


class BatchWorker:
    """An EngineWorker over `engine` (default: a fake one) and a RoundRobinBatch, gated: one step per
    `release()`."""

    def __init__(self, engine=None, max_batch: int = 4, gated: bool = True) -> None:
        self.engine = engine or fake_engine()
        self.metrics = ServerMetrics()
        self.gate = threading.Semaphore(0) if gated else None
        self.made: list[RoundRobinBatch] = []
        self.released = 0

        def make() -> RoundRobinBatch:
            self.made.append(RoundRobinBatch(self.engine, max_batch, self.gate))
            return self.made[-1]

        self.worker = EngineWorker(self.engine, self.metrics, max_batch=max_batch, stepper=make)
        self.prompts = [self.engine.encode(t) for t in TEXTS]

    @property
    def batch(self) -> RoundRobinBatch:
        return self.made[-1]

    def release(self) -> None:
        """Let the step the worker waits in go (none if it waits for no step)."""
        if self.gate is not None and sum(b.asked for b in self.made) > self.released:
            self.released += 1
            self.gate.release()

    def run(self, main) -> None:
        self.worker.start()
        try:
            asyncio.run(main())
        finally:
            self.worker.close()


def job_for(prompt: list[int], params: SamplingParams):
    return lambda _engine: (prompt, params)


def drain(job) -> list:
    """The job's events delivered so far."""
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


async def until_end(job, bw: BatchWorker) -> list:
    """The job's events up to Finished or Failed, releasing a step whenever none is waiting."""
    events: list = []
    deadline = time.monotonic() + TIMEOUT
    while not events or not isinstance(events[-1], (Finished, Failed)):
        assert time.monotonic() < deadline, events
        if job.events.empty():
            bw.release()
            await asyncio.sleep(0.002)
        else:
            events.append(job.events.get_nowait())
    return events


def result_tokens(events: list) -> list[int]:
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished), (events[:1], events[-1:])
    chunks = events[1:-1]
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].result.completion_tokens
    return chunks[-1].result.token_ids


def test_a_request_joins_the_running_batch_and_every_request_keeps_its_solo_tokens() -> None:
    bw = BatchWorker()
    (a_prompt, b_prompt), got = bw.prompts[:2], {}
    a_params, b_params = SamplingParams(max_new_tokens=30, **GREEDY), SamplingParams(max_new_tokens=4, **SEEDED)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a = bw.worker.submit(job_for(a_prompt, a_params), loop)
        a_events: list = []
        while len(a_events) < 2:  # Started, first chunk
            bw.release()
            await asyncio.sleep(0.002)
            a_events += drain(a)
        b = bw.worker.submit(job_for(b_prompt, b_params), loop)
        got["b"] = await until_end(b, bw)  # each step advances a too
        a_events += drain(a)
        assert not any(isinstance(e, Finished) for e in a_events)  # b came and left while a ran
        got["a"] = a_events + await until_end(a, bw)

    bw.run(main)
    assert result_tokens(got["a"]) == solo(a_prompt, a_params)
    assert result_tokens(got["b"]) == solo(b_prompt, b_params)
    a_id, b_id = bw.batch.submitted
    assert sum(step == [a_id, b_id] for step in bw.batch.steps) >= 3, bw.batch.steps
    assert bw.metrics.batch_size.total > bw.metrics.batch_size.count  # mean batch size > 1
    assert bw.metrics.running == 0 and bw.metrics.time_to_first_token.count == 2


def test_cancelling_one_request_leaves_the_others_intact() -> None:
    bw = BatchWorker()
    prompts = bw.prompts[:3]
    params = [SamplingParams(max_new_tokens=12, **GREEDY), SamplingParams(max_new_tokens=20, **SEEDED),
              SamplingParams(max_new_tokens=9, **SEEDED)]
    got: list[list] = [[], [], []]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [bw.worker.submit(job_for(p, q), loop) for p, q in zip(prompts, params)]
        deadline = time.monotonic() + TIMEOUT
        while any(len(g) < 3 for g in got):  # Started + 2 chunks each: all three run together
            assert time.monotonic() < deadline
            bw.release()
            await asyncio.sleep(0.02)
            for job, g in zip(jobs, got):
                g += drain(job)
        jobs[1].cancel()
        for i in (0, 2):
            got[i] += await until_end(jobs[i], bw)
        for _ in range(3):  # steps after the cancel: no event for the cancelled one
            bw.release()
        await asyncio.sleep(0.1)
        got[1] += drain(jobs[1])

    bw.run(main)
    assert bw.batch.cancelled == [bw.batch.submitted[1]]  # the cancelled request's id, and only it
    for i in (0, 2):
        assert result_tokens(got[i]) == solo(prompts[i], params[i])
    assert not any(isinstance(e, (Finished, Failed)) for e in got[1])
    assert len(got[1]) <= 1 + 4  # Started + the chunks of at most the steps before the cancel was seen
    assert bw.metrics.cancelled_requests == 1 and bw.metrics.running == 0


def test_a_request_refused_by_its_checks_fails_alone_while_others_run() -> None:
    bw = BatchWorker()
    prompt = bw.prompts[0]
    params = SamplingParams(max_new_tokens=10, **SEEDED)
    got: dict[str, list] = {}

    def broken(_engine):
        raise ValueError("no such prompt")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        good = bw.worker.submit(job_for(prompt, params), loop)
        got["good"] = []
        while not got["good"]:
            bw.release()
            await asyncio.sleep(0.002)
            got["good"] += drain(good)
        too_long = job_for(list(range(1, 70)), SamplingParams(max_new_tokens=2))
        bad_bias = job_for(prompt, SamplingParams(max_new_tokens=2, logit_bias={10 ** 6: 1.0}))
        for name, build in (("too_long", too_long), ("bad_bias", bad_bias), ("broken", broken)):
            got[name] = await until_end(bw.worker.submit(build, loop), bw)
        got["good"] += await until_end(good, bw)

    bw.run(main)
    failures = [got[name] for name in ("too_long", "bad_bias", "broken")]
    assert all(len(f) == 1 and isinstance(f[0], Failed) for f in failures), failures
    assert [type(f[0].error).__name__ for f in failures] == ["PromptError", "PromptError", "ValueError"]
    assert "context holds 64" in str(failures[0][0].error)
    assert result_tokens(got["good"]) == solo(prompt, params)
    assert len(bw.batch.submitted) == 1  # the refused requests never reached the batch


class LostBatch(RoundRobinBatch):
    """A batch whose step raises (not an error event) and that cannot cancel: its state is unknown."""

    def step(self):
        super().step()
        raise RuntimeError("kernel exploded")

    def cancel(self, request_id: int) -> None:
        raise RuntimeError("batch state lost")


@pytest.mark.parametrize("how", ["error-events", "step-raises"])
def test_a_failed_step_fails_its_requests_and_the_server_serves_the_next(how: str) -> None:
    if how == "error-events":  # the forward fails for every request in it (BatchEngine: error events)
        bw = BatchWorker(fake_engine(fail_at=3, error=RuntimeError("kernel exploded")), gated=False)
    else:  # the batch itself breaks: the worker fails its requests and makes a fresh batch
        bw = BatchWorker(gated=False)
        bw.made.clear()
        bw.worker._make_stepper = lambda: bw.made.append((LostBatch if not bw.made else RoundRobinBatch)(
            bw.engine, 4)) or bw.made[-1]
        bw.worker._stepper = bw.worker._make_stepper()
    prompt = bw.prompts[0]
    got: list[list] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        jobs = [bw.worker.submit(job_for(prompt, SamplingParams(max_new_tokens=8)), loop) for _ in range(2)]
        got.extend([await until_end(job, bw) for job in jobs])
        got.append(await until_end(bw.worker.submit(job_for(prompt, SamplingParams(max_new_tokens=2)), loop), bw))

    bw.run(main)
    failed = [events for events in got[:2] if isinstance(events[-1], Failed)]
    assert failed and all("kernel exploded" in str(events[-1].error) for events in failed)
    for events in got[:2]:  # the model fails the 4th forward since any prompt: a request alone may finish
        if events not in failed:
            assert how == "error-events" and result_tokens(events) == solo(prompt, SamplingParams(max_new_tokens=8))
    assert len(result_tokens(got[2])) == 2
    if how == "error-events":  # the failed requests left the batch, which goes on
        assert len(bw.made) == 1 and not bw.batch.cancelled
    else:
        assert len(bw.made) >= 2 and bw.made[-1].submitted == [bw.made[-1].submitted[0]]
    assert bw.metrics.running == 0


def test_concurrent_api_streams_get_their_solo_output() -> None:
    engine = fake_engine()
    batches: list[RoundRobinBatch] = []

    class SlowBatch(RoundRobinBatch):
        def step(self):
            time.sleep(0.03)  # a window for the other requests to join mid-stream
            return super().step()

    def make() -> RoundRobinBatch:
        batches.append(SlowBatch(engine, 4))
        return batches[-1]

    kws = [dict(max_tokens=8 + 3 * i, **(GREEDY if i % 2 else SEEDED)) for i in range(4)]
    with served(fake_engine()) as http:  # alone, one at a time (--max-batch 1)
        client = openai_client(http)
        alone = [client.completions.create(model="fake", prompt=t, **kw).choices[0].text for t, kw in zip(TEXTS, kws)]
    together: list = [None] * 4
    with served(engine, stepper=make, max_batch=4) as http:
        client = openai_client(http)
        barrier = threading.Barrier(4)

        def one(i: int) -> None:
            barrier.wait(TIMEOUT)
            stream = client.completions.create(model="fake", prompt=TEXTS[i], stream=True, **kws[i])
            together[i] = "".join(c.choices[0].text for c in stream if c.choices)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = http.get("/metrics").text
    assert together == alone
    assert max(len(s) for s in batches[0].steps) >= 2, batches[0].steps  # they did run together
    assert "hybrimoe_server_max_batch 4" in metrics and "hybrimoe_server_batch_size_count" in metrics


def test_shutdown_refuses_the_queued_and_ends_every_running_request_after_its_grace() -> None:
    from test_server_failures import sse_events

    engine, gate = fake_engine(), threading.Semaphore(0)
    batches: list[RoundRobinBatch] = []
    body = {"model": "fake", "prompt": "hello", "max_tokens": 40, "stream": True}
    results: dict[str, object] = {}

    def make() -> RoundRobinBatch:
        batches.append(RoundRobinBatch(engine, 2, gate))
        return batches[-1]

    with served(engine, stepper=make, max_batch=2, shutdown_timeout=0.5) as http:
        state = http.app.state.server

        def send(name: str) -> None:
            results[name] = http.post("/v1/completions", json=body)

        running = [threading.Thread(target=send, args=(f"running{i}",)) for i in range(2)]
        for t in running:
            t.start()
        deadline, released = time.monotonic() + TIMEOUT, 0
        while state.metrics.time_to_first_token.count < 2:  # steps one by one until both are streaming
            assert time.monotonic() < deadline
            if batches[0].asked > released:
                released += 1
                gate.release()
            time.sleep(0.005)
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        while state.metrics.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        http.portal.call(state.begin_shutdown)  # what SIGTERM does; the worker waits in a step meanwhile
        queued.join(TIMEOUT)
        for t in running:
            t.join(TIMEOUT)
        for _ in range(100):  # let the worker notice the cancels and finish
            gate.release()
    assert results["queued"].status_code == 503 and results["queued"].json()["error"]["code"] == "shutting_down"
    for i in range(2):
        response = results[f"running{i}"]
        events = sse_events(response)
        assert events, (response.status_code, response.text[:300])
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events
    assert state.metrics.running == 0
