"""Tokenising prompts before they are queued, off the engine thread and off the event loop.

A small thread pool, each thread with its own copy of the engine's tokenizer (a tokenizer is not safe
to share between threads), runs a request's build step: tokenise, check the context, size the
request. A long prompt then delays neither the engine nor other requests' tokenisation (2 threads).

Before any tokenisation, a prompt whose characters cannot fit in the context whatever the tokens
are is refused at once: no token of the vocabulary spans more than `max_token_chars` characters, so
`len(text) / max_token_chars` tokens are the least the text can become (x4 for normalisers that
merge characters, e.g. NFC). A 3.9 MB prompt to a 4k-context model costs no tokenisation at all.
The bound assumes a tokenizer that keeps every character (byte-level BPE, SentencePiece: what MoE
LLMs use); one that drops whitespace (WordPiece) could see a long mostly-blank prompt refused.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

ENCODE_THREADS = 2
NORMALISER_SLACK = 4  # characters a normaliser might merge into one (bound is only used to refuse)
T = TypeVar("T")


def max_token_chars(tokenizer: Any) -> int | None:
    """Most characters any vocabulary entry spans (byte-level entries: bytes, >= characters); None if unknown."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        vocab = get_vocab()
    except Exception:  # noqa: BLE001 -- a tokenizer without a readable vocabulary: no early refusal
        return None
    return max((len(token) for token in vocab), default=None) or None


class PromptEncoder:
    """Runs build steps `fn(engine_view)` on a pool whose threads each own a tokenizer copy.

    `engine_view` is a shallow copy of the engine whose `tokenizer` is the thread's own; only its
    `encode` / `encode_chat` (and plain attributes such as `max_context`) may be used there.
    """

    def __init__(self, engine: Any, threads: int = ENCODE_THREADS) -> None:
        self.engine = engine
        tokenizer = getattr(engine, "tokenizer", None)
        self.max_token_chars = max_token_chars(tokenizer) if tokenizer is not None else None
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hybrimoe-tokenize")

    def max_prompt_chars(self, context_tokens: int) -> int | None:
        """Characters beyond which a prompt surely has more than `context_tokens` tokens (None = no bound)."""
        if self.max_token_chars is None:
            return None
        return context_tokens * self.max_token_chars * NORMALISER_SLACK

    def _view(self) -> Any:
        view = getattr(self._local, "view", None)
        if view is None:
            tokenizer = getattr(self.engine, "tokenizer", None)
            if tokenizer is None:
                view = self.engine
            else:
                view = copy.copy(self.engine)
                view.tokenizer = copy.deepcopy(tokenizer)
            self._local.view = view
        return view

    async def run(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._view()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
