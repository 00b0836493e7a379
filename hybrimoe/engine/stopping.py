"""Streaming text: incremental detokenisation and stop-string hold-back.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas whose concatenation
equals `tokenizer.decode(ids)`, never emitting half a UTF-8 character (byte-level tokenizers split
multi-byte characters across tokens; a partial one decodes to U+FFFD and is held until complete).

`StopStringFilter` receives those deltas and releases only text that can no longer be the start
of a stop string; on a match it cuts the text before the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    """Decodes `ids` a window at a time: text of ids[prefix:] minus text of ids[prefix:read].

    Decoding a window that starts a few tokens back (not at the new token alone) keeps the spaces
    and merges that tokenizers apply between neighbouring tokens.
    """

    tokenizer: Any
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the context window
    read_offset: int = 0  # ids before this index have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became certain (possibly "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end is emitted as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)):
            return ""
        if not full_text.startswith(prefix_text):
            # A decoder that rewrites earlier text when more tokens arrive: emit what is new.
            common = 0
            while common < min(len(prefix_text), len(full_text)) and prefix_text[common] == full_text[common]:
                common += 1
            prefix_text = prefix_text[:common]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]


@dataclass
class StopStringFilter:
    """Holds back text that could begin a stop string; finds the first full match."""

    stop_strings: list[str]
    text: str = ""  # everything received so far
    emitted: int = 0  # text[:emitted] has been released
    stopped: bool = False

    def push(self, delta: str) -> str:
        """Add `delta`; return the text now safe to release. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        self.text += delta
        # No stop string can begin before `emitted`: it would have been matched or held back.
        cut = self._first_match()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: release whatever is still held (no match is possible now)."""
        return "" if self.stopped else self._release(len(self.text))

    @property
    def released_text(self) -> str:
        return self.text[:self.emitted]

    def _first_match(self) -> int | None:
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of a stop string."""
        pending = self.text[self.emitted:]
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
