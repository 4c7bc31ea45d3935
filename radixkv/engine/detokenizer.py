"""Incremental detokenization: the text of a growing token sequence in O(new tokens) per step.

Decoding the whole output after every token is quadratic. Decoding one token alone is wrong in
general: byte-level BPE tokens may hold part of a UTF-8 character, and some tokenizers render a
token differently depending on the one before it (a leading space). So each step decodes a short
window: the tokens from `prefix` on, minus the text those same tokens up to `read` already gave.
The window's first tokens serve as context only; text is emitted only once it no longer ends in
an incomplete character (U+FFFD). A U+FFFD that later bytes have made final (invalid UTF-8, e.g.
a run of lone bytes from a confused model) is emitted at once, so at most the last 3 tokens are
ever held back and the window stays short.

Stop strings are searched in the new text plus the last `len(stop) - 1` characters before it, so
a stop spanning a token boundary is found and the scan never re-reads the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # tokens of left context kept in the decode window
MAX_PENDING_TOKENS = 3  # an incomplete UTF-8 character spans at most 3 bytes, so 3 tokens


class IncrementalDetokenizer:
    """The text of one request's output, grown a token at a time.

    `text` is what `tokenizer.decode(all_ids, skip_special_tokens=...)` returns, held back while
    the last token ends mid-character; after `finish()` it is complete (and cut at a stop
    string). `stop_hit` holds the stop string that ended it, if any.
    """

    __slots__ = ("_tok", "_ids", "_prefix", "_read", "_skip", "_stops", "_max_stop",
                 "_include_stop", "text", "stop_hit")

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), *,
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False
                 ) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start (context only)
        self._read = 0  # tokens whose text is already in `text`
        self._skip = skip_special_tokens
        self._stops = tuple(stop)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_str_in_output
        self.text = ""
        self.stop_hit: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int, check_stop: bool = True) -> str:
        """Append a token; returns the text it completed ("" while a character is unfinished).

        Once a stop string appears in the new text, `text` is cut there, `stop_hit` is set and
        "" is returned for the rest; the caller ends the request. `check_stop=False` (before
        `min_tokens`) does not look for stop strings in this token's text.
        """
        if self.stop_hit is not None:
            return ""
        self._ids.append(token_id)
        return self._flush(final=False, check_stop=check_stop)

    def _flush(self, final: bool, check_stop: bool = True) -> str:
        ids = self._ids
        before = self._decode(ids[self._prefix:self._read])
        window = self._decode(ids[self._prefix:])
        end = len(ids)
        if window.endswith(_REPLACEMENT) and not final:
            # The last tokens may hold the start of a character still to come. Emit up to the
            # latest boundary whose text is a strict prefix of the window: its own trailing
            # U+FFFD, if any, was ended by later bytes (invalid UTF-8, as in a run of lone
            # bytes), so it is final. An incomplete character is at most 3 bytes, so looking
            # back 3 tokens suffices and bytes that can never form a character are not held
            # until the end of the request.
            for j in range(end - 1, max(self._read, end - MAX_PENDING_TOKENS - 1), -1):
                head = self._decode(ids[self._prefix:j])
                if len(before) < len(head) < len(window) and window.startswith(head):
                    window, end = head, j
                    break
            else:
                return ""
        if len(window) <= len(before):
            return ""
        new = window[len(before):]
        self._read = end
        self._prefix = max(self._prefix, self._read - CONTEXT_TOKENS)
        return self._append(new, check_stop)

    def _append(self, new: str, check_stop: bool) -> str:
        old_len = len(self.text)
        self.text += new
        if self._stops and check_stop:
            lo = max(0, old_len - self._max_stop + 1)
            hits = [(i, s) for s in self._stops if (i := self.text.find(s, lo)) >= 0]
            if hits:
                i, s = min(hits)
                self.stop_hit = s
                self.text = self.text[:i + len(s)] if self._include_stop else self.text[:i]
                return self.text[old_len:] if len(self.text) > old_len else ""
        return new

    def finish(self) -> None:
        """Flush what is held back (an incomplete final character is kept as U+FFFD)."""
        if self.stop_hit is None and self._read < len(self._ids):
            self._flush(final=True)

    def safe_text(self) -> str:
        """`text` minus a tail that could still grow into a stop string (for streaming)."""
        text = self.text
        if self.stop_hit is not None or not self._stops:
            return text
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text
