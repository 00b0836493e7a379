"""`hybrimoe serve --max-batch`: the option's checks and the KV memory of the batch, checked with the
numbers before the batch is made."""

from __future__ import annotations

import pytest
from server_fakes import fake_engine

from hybrimoe.errors import BudgetError, ConfigError
from hybrimoe.server.batching import check_batch_memory
from hybrimoe.server.options import ServerOptions


def test_the_kv_memory_of_the_batch_is_checked_with_the_numbers() -> None:
    engine = fake_engine()
    gib = 1024 ** 3
    check_batch_memory(engine, 8, kv_bytes=2 * gib, free_bytes=3 * gib)
    with pytest.raises(BudgetError) as refused:
        check_batch_memory(engine, 8, kv_bytes=8 * gib, free_bytes=2 * gib)
    message = str(refused.value)
    assert "--max-batch 8 needs 8.00 GiB" in message and "1.000 GiB at the context of 64 tokens" in message
    assert "2.00 GiB free" in message and "--max-context" in message and "\n" not in message
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="--max-batch"):
            ServerOptions(max_batch=bad)


def test_serve_max_batch_flag_and_the_kv_check_before_the_batch_is_made(tiny_checkpoint, monkeypatch) -> None:
    import argparse

    from hybrimoe.cli import serve
    from hybrimoe.engine import Engine
    from hybrimoe.engine.batch import BatchEngine
    from hybrimoe.server import batching

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    assert serve.options_from_args(parser.parse_args(["serve", "--max-batch", "4"])).max_batch == 4
    assert serve.options_from_args(parser.parse_args(["serve"])).max_batch == 1
    with pytest.raises(ConfigError, match="--max-batch"):
        serve.options_from_args(parser.parse_args(["serve", "--max-batch", "0"]))
    assert serve.options_from_args(parser.parse_args(["serve", "--prefill-chunk", "64"])).prefill_chunk == 64
    assert serve.options_from_args(parser.parse_args(["serve"])).prefill_chunk == 256
    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match="--prefill-chunk"):
            serve.options_from_args(parser.parse_args(["serve", "--prefill-chunk", bad]))

    engine = Engine.from_pretrained(tiny_checkpoint("mixtral"), dtype="fp32")
    needed = BatchEngine.kv_bytes(engine, 8)
    assert needed == 8 * BatchEngine.kv_bytes(engine, 1) > 0
    assert isinstance(batching.make_stepper(engine, 1), batching.SerialBatch)  # today's path: no batch KV
    monkeypatch.setattr(batching, "free_bytes_for", lambda device: needed - 1)
    with pytest.raises(BudgetError, match=r"--max-batch 8 needs .* at the context of \d+ tokens"):
        batching.make_stepper(engine, 8)
    monkeypatch.setattr(batching, "free_bytes_for", lambda device: needed)
    assert isinstance(batching.make_stepper(engine, 8), BatchEngine)
    assert batching.make_stepper(engine, 8, prefill_chunk=64).prefill_chunk == 64  # --prefill-chunk reaches it
    # and through the app: create_app(options) -> EngineWorker -> make_stepper
    from hybrimoe.server.app import create_app
    from hybrimoe.server.options import ServerOptions as Options
    app = create_app(engine, Options(max_batch=8, prefill_chunk=48))
    assert app.state.server.worker._stepper.prefill_chunk == 48
