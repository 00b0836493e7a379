"""EngineWorker in process, over a fake engine whose tokens the test releases one at a time: events
in order, a cancelled job stops between tokens and closes its stream, a failing build leaves the
worker serving, close() stops the running job, drops the queued ones and closes the engine; and the
app over it in process (no tokenizer needed)."""

from __future__ import annotations

import asyncio
import threading

from hybrimoe.engine.types import GenerationResult, SamplingParams, StreamChunk
from hybrimoe.server.metrics import ServerMetrics
from hybrimoe.server.worker import EngineWorker, Failed, Finished, Started

TIMEOUT = 10.0


class GatedEngine:
    """Yields token i (i = 0, 1, ...) after the test calls `release()`; the first one is free."""

    model_name = "gated"
    max_context = 64

    def __init__(self) -> None:
        self.tokens = threading.Semaphore(0)
        self.streams_closed = 0
        self.closed = False

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.tokens.release()

    def stats(self) -> dict[str, float]:
        return {"requests": 0}

    def close(self) -> None:
        self.closed = True

    def stream(self, prompt_ids: list[int], params: SamplingParams):
        def chunks():
            try:
                n = params.max_new_tokens
                for i in range(n):
                    if i and not self.tokens.acquire(timeout=TIMEOUT):
                        raise TimeoutError("the test never released the next token")
                    if i < n - 1:
                        yield StreamChunk(token_ids=[i], text=f"{i} ")
                result = GenerationResult(text="", token_ids=list(range(n)), prompt_tokens=len(prompt_ids),
                                          completion_tokens=n, finish_reason="length", prefill_seconds=0.0,
                                          decode_seconds=0.0, decode_tokens_per_second=0.0)
                yield StreamChunk(token_ids=[n - 1], text=f"{n - 1}", finish_reason="length", result=result)
            finally:
                self.streams_closed += 1
        return chunks()


def build(max_new_tokens: int):
    return lambda engine: ([1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens))


async def events_until_end(job) -> list:
    events = []
    while not events or not isinstance(events[-1], (Finished, Failed)):
        events.append(await asyncio.wait_for(job.next_event(), TIMEOUT))
    return events


def test_events_in_order_and_a_failed_build_leaves_the_worker_serving() -> None:
    engine, metrics = GatedEngine(), ServerMetrics()
    worker = EngineWorker(engine, metrics)

    def bad_build(engine):
        raise ValueError("no such prompt")

    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        failing = worker.submit(bad_build, loop)
        good = worker.submit(build(3), loop)
        engine.release(2)
        return await events_until_end(failing), await events_until_end(good)

    worker.start()
    try:
        failed, served = asyncio.run(main())
    finally:
        worker.close()
    assert len(failed) == 1 and isinstance(failed[0].error, ValueError)
    assert isinstance(served[0], Started) and isinstance(served[-1], Finished)
    chunks = served[1:-1]
    assert [c.token_ids for c in chunks] == [[0], [1], [2]] and chunks[-1].result.completion_tokens == 3
    assert metrics.generation_tokens == 3 and metrics.running == 0 and metrics.queue_depth == 0


def test_cancel_stops_between_tokens_and_close_drops_the_queue() -> None:
    engine, metrics = GatedEngine(), ServerMetrics()
    worker = EngineWorker(engine, metrics)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cancelled = worker.submit(build(50), loop)
        assert isinstance(await asyncio.wait_for(cancelled.next_event(), TIMEOUT), Started)
        assert (await asyncio.wait_for(cancelled.next_event(), TIMEOUT)).token_ids == [0]
        cancelled.cancel()
        engine.release()  # token 1 is produced, then the worker sees the cancel
        running = worker.submit(build(50), loop)
        queued = worker.submit(build(3), loop)
        assert isinstance(await asyncio.wait_for(running.next_event(), TIMEOUT), Started)
        closing = asyncio.ensure_future(asyncio.to_thread(worker.close))
        for _ in range(int(TIMEOUT / 0.01)):  # close() cancels the job that waits for its next token
            if running.cancelled:
                break
            await asyncio.sleep(0.01)
        assert running.cancelled
        engine.release()
        await asyncio.wait_for(closing, TIMEOUT)
        assert queued.cancelled and queued.events.empty()

    worker.start()
    try:
        asyncio.run(main())
    finally:
        worker.close()
    assert not worker.alive and engine.closed
    assert engine.streams_closed == 2  # both started streams were closed, neither ran to its end
    assert metrics.cancelled_requests == 2 and metrics.running == 0 and metrics.queue_depth == 0
    assert metrics.generation_tokens < 10


def test_a_served_model_name_with_a_slash_can_be_retrieved() -> None:
    from fastapi.testclient import TestClient

    from hybrimoe.server.app import create_app

    with TestClient(create_app(GatedEngine(), model_name="org/tiny"), base_url="http://127.0.0.1") as client:
        assert client.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
        assert client.get("/v1/models/org/other").status_code == 404
        assert client.get("/v1/models").json()["data"][0]["id"] == "org/tiny"


def test_a_client_leaving_cancels_its_job_even_if_no_response_code_runs_again() -> None:
    from hybrimoe.server.jobs import start_job

    class LeavingRequest:
        """Starlette's Request as start_job uses it: receive() answers http.disconnect once `left` is set."""

        def __init__(self) -> None:
            self.left = asyncio.Event()

        async def receive(self) -> dict:
            await self.left.wait()
            return {"type": "http.disconnect"}

    engine, metrics = GatedEngine(), ServerMetrics()
    worker = EngineWorker(engine, metrics)

    async def main() -> bool:
        request = LeavingRequest()
        running = await start_job(worker, build(50), request)  # accepted: the first token is out
        request.left.set()  # nobody reads running.chunks() or calls running.close() after this
        await asyncio.sleep(0.05)
        cancelled = running.job.cancelled
        engine.release()  # the worker produces the next token, sees the cancel and stops
        return cancelled

    worker.start()
    try:
        assert asyncio.run(main())
    finally:
        worker.close()
    assert engine.streams_closed == 1 and metrics.cancelled_requests == 1
