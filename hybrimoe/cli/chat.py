"""`hybrimoe chat`: an interactive chat in the terminal, streamed, with the model's chat template.

Each line you type is a user message; the reply streams to stdout and joins the history, so the
next turn sees the whole conversation. Commands: /reset (forget the history, keep --system),
/exit (or end of input, Ctrl-D). Ctrl-C during a reply stops it and keeps what was said so far.
Notices go to stderr; with piped input (no prompt shown) stdout holds only the replies, one per turn,
each ending with a newline.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from hybrimoe.cli.generate import (
    add_model_arguments,
    add_sampling_arguments,
    engine_from_args,
    sampling_params_from_args,
)
from hybrimoe.engine.types import SamplingParams
from hybrimoe.errors import ConfigError, HybrimoeError

COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "leave the chat",
            "/help": "list the commands"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal",
                                   description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt of the conversation")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


@dataclass
class ChatSession:
    """The conversation and how to extend it; `engine` has the Engine contract."""

    engine: Any
    params: SamplingParams
    system: str | None = None
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the streams of when the chat starts,
    err: TextIO = field(default_factory=lambda: sys.stderr)  # not of when this module was imported
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> str | None:
        """Stream the assistant's answer to `user_text`; None if the conversation cannot go on."""
        messages = self.history + [{"role": "user", "content": user_text}]
        try:
            prompt_ids = self.engine.encode_chat(messages)
            stream = self.engine.stream(prompt_ids, self.params)
            parts: list[str] = []
            try:
                for chunk in stream:
                    parts.append(chunk.text)
                    self.out.write(chunk.text)
                    self.out.flush()
            except KeyboardInterrupt:
                getattr(stream, "close", lambda: None)()  # frees the engine's sequence now
                self.err.write("\n(interrupted)")
        except HybrimoeError as exc:
            self.err.write(f"error: {exc}\n(use /reset to start a new conversation)\n")
            return None
        text = "".join(parts)
        self.out.write("\n")
        self.out.flush()
        self.history = messages + [{"role": "assistant", "content": text}]
        return text


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    params = sampling_params_from_args(args)
    if args.model is None:
        raise ConfigError("chat needs a tokenizer: give --model DIR")
    engine = engine_from_args(args)
    try:
        _converse(ChatSession(engine, params, system=args.system), stdin or sys.stdin)
    finally:
        engine.close()  # the hybrid runtime's CPU worker and device slots
    return 0


def _converse(session: ChatSession, stdin: TextIO) -> None:
    """Read turns and commands until /exit or the end of input."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        sys.stderr.write(f"chatting with {session.engine.model_name}; /help lists the commands, Ctrl-D leaves\n")
    while True:
        line = _read_line(stdin, interactive)
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                sys.stderr.write("(conversation cleared)\n")
            else:
                if command != "/help":
                    sys.stderr.write(f"unknown command {command}\n")
                sys.stderr.write("".join(f"  {name:7} {what}\n" for name, what in COMMANDS.items()))
            continue
        session.reply(text)


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """One line of input, None at end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            sys.stderr.write("\n")
            return None
    line = stdin.readline()
    return line if line else None
