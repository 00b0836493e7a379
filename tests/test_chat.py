"""`hybrimoe chat` driven through a subprocess with piped stdin: streamed replies equal the engine's
greedy answer to the whole conversation (chat template + history), /reset forgets, /exit and end of
input leave cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_utils import REPO_ROOT, subprocess_env

from hybrimoe.engine import Engine, SamplingParams

MAX_NEW = 8
SYSTEM = "You answer in one short sentence."


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3-moe")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine.from_pretrained(model_dir, dtype="fp32")


def expected_reply(engine: Engine, messages: list[dict[str, str]]) -> str:
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
    return engine.generate(engine.encode_chat(messages), params).text


def run_chat(model_dir: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    """The chat with `stdin` piped in; bytes are decoded as UTF-8 without newline translation,
    so a reply containing '\\r' reads back exactly."""
    cmd = [sys.executable, "-m", "hybrimoe", "chat", "--model", str(model_dir), "--dtype", "fp32",
           "--max-new-tokens", str(MAX_NEW), "--temperature", "0", *flags]
    env = {**subprocess_env(), "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(cmd, check=False, input=stdin.encode(), capture_output=True, env=env, cwd=REPO_ROOT,
                          timeout=300)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8"),
                                       done.stderr.decode("utf-8", errors="replace"))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_history_reset_and_end_of_input(model_dir: Path, engine: Engine) -> None:
    system = [{"role": "system", "content": SYSTEM}]
    first = expected_reply(engine, system + [user("hello there")])
    second = expected_reply(engine, system + [user("hello there"), {"role": "assistant", "content": first},
                                              user("what is the sea?")])
    # The history must matter, or this test could not tell a chat from single prompts.
    assert second != expected_reply(engine, system + [user("what is the sea?")])

    done = run_chat(model_dir, "hello there\n\nwhat is the sea?\n/bogus\n/reset\nhello there\n", "--system", SYSTEM)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first}\n{second}\n{first}\n"  # after /reset the first turn repeats
    assert "conversation cleared" in done.stderr
    assert "unknown command /bogus" in done.stderr and "/reset" in done.stderr


def test_context_overflow_is_reported_then_exit_stops_reading(model_dir: Path, engine: Engine) -> None:
    too_long = "the quick brown fox " * 400  # more tokens than the tiny model's context
    reply = expected_reply(engine, [user("hello there")])  # no --system: no system message
    done = run_chat(model_dir, f"{too_long}\nhello there\n/exit\nwhat is the sea?\n")
    assert done.returncode == 0, done.stderr
    assert "error:" in done.stderr and "/reset" in done.stderr
    assert done.stdout == f"{reply}\n"  # the failed turn left no trace; nothing after /exit ran


def test_session_writes_to_the_current_stdout_and_reports_a_refused_chat(capsys) -> None:
    from engine_fakes import FakeConfig, FakeModel, make_tokenizer

    from hybrimoe.cli.chat import ChatSession

    tokenizer = make_tokenizer()
    fake = Engine(FakeModel(FakeConfig(vocab_size=len(tokenizer))), tokenizer, "fake")
    session = ChatSession(fake, SamplingParams(max_new_tokens=4), system="be brief")
    reply = session.reply("hi")
    assert capsys.readouterr().out == reply + "\n"  # capsys swaps sys.stdout after the module was imported
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    assert session.reply("again") is None
    captured = capsys.readouterr()
    assert captured.out == "" and "no system role" in captured.err
    assert len(session.history) == 3  # the refused turn left no trace
