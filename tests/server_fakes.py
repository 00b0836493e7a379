"""In-process servers for the server tests: the real app and a real Engine over the fake model of
engine_fakes (a 64-token context, a byte-level BPE tokenizer), driven through Starlette's TestClient;
models that fail on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import openai
import torch
from engine_fakes import FakeConfig, FakeModel, make_tokenizer
from fastapi.testclient import TestClient

from hybrimoe.engine import Engine
from hybrimoe.server.app import create_app
from hybrimoe.server.options import ServerOptions

BASE_URL = "http://127.0.0.1"  # a loopback Host, as a local client sends


class Crash(BaseException):
    """Something that kills a thread (not an Exception: the worker's per-request handler cannot stop it)."""


class FailingModel(FakeModel):
    """FakeModel whose forward number `fail_at` of every request (0 = prefill) raises `error`, or returns
    NaN logits when `error` is None."""

    def __init__(self, config: FakeConfig, fail_at: int, error: BaseException | None) -> None:
        super().__init__(config)
        self.fail_at, self.error = fail_at, error
        self.step = -1  # forwards of the current request so far, minus one

    def forward(self, input_ids: torch.Tensor, start_pos: int, kv) -> torch.Tensor:
        logits = super().forward(input_ids, start_pos, kv)
        self.step = 0 if start_pos == 0 else self.step + 1
        if self.step == self.fail_at:
            if self.error is not None:
                raise self.error
            return torch.full_like(logits, float("nan"))
        return logits


def fake_engine(fail_at: int | None = None, error: BaseException | None = None) -> Engine:
    tokenizer = make_tokenizer()
    config = FakeConfig(vocab_size=len(tokenizer))
    model = FakeModel(config) if fail_at is None else FailingModel(config, fail_at, error)
    return Engine(model, tokenizer, "fake")


@contextmanager
def served(engine: Engine | None = None, stepper=None, **options) -> Iterator[TestClient]:
    """A TestClient of the app over `engine` (default: a fake engine) with ServerOptions(**options),
    the worker stepping the batch `stepper()` makes (default: the server's own)."""
    app = create_app(engine or fake_engine(), ServerOptions(**options), stepper=stepper)
    with TestClient(app, base_url=BASE_URL) as client:
        yield client


def openai_client(http: TestClient, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL + "/v1", api_key=api_key, max_retries=0, http_client=http)
