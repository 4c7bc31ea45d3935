"""Tokenizers for the demo: the default model's when it loads, else a word tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from radixkv.errors import ConfigError


class WordTokenizer:
    """A fallback tokenizer: words and punctuation, each with the whitespace before it.

    Ids are handed out on first sight, so `decode(encode(text)) == text` for any text this
    instance has encoded. Used when the default model's tokenizer is not available.
    """

    _PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self._PIECE.findall(text):
            if piece not in self._ids:
                self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            out.append(self._ids[piece])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self._pieces[int(i)] for i in ids)
        except IndexError as exc:
            raise ConfigError(f"token id not in this WordTokenizer's vocabulary: {exc}") from exc

    def __len__(self) -> int:
        return len(self._pieces)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template when it has one, else 'role: text'."""
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template) and getattr(tokenizer, "chat_template", None):
        ids = template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return [int(i) for i in tokenizer.encode(text)]


def load_demo_tokenizer(kind: str = "auto") -> tuple[Any, str]:
    """(tokenizer, description). kind 'model': the default model's tokenizer (error if missing);
    'word': `WordTokenizer`; 'auto': the model's when it loads, else the word tokenizer."""
    if kind not in ("auto", "model", "word"):
        raise ConfigError(f"tokenizer kind must be auto, model or word, got {kind!r}")
    if kind == "word":
        return WordTokenizer(), "word tokenizer (radixkv.tools.viz.WordTokenizer)"
    try:
        from radixkv.model import load_tokenizer

        tok = load_tokenizer(None)
        return tok, f"default model tokenizer ({type(tok).__name__})"
    except Exception as exc:  # any failure to load falls back, and says why
        if kind == "model":
            raise ConfigError(f"the default model's tokenizer did not load: "
                              f"{type(exc).__name__}: {exc}") from exc
        return WordTokenizer(), (f"word tokenizer (the default model's tokenizer did not load: "
                                 f"{type(exc).__name__}: {exc})")
