"""The bytes of one stored tier page, and their verification.

    header  : magic "RKVP", version u16, flags u16, n_tokens u32, key [16]
    tokens  : int32 [n_tokens]               (the page's own tokens)
    payload : each pool buffer's rows of the page's slots, buffer after buffer, raw bytes
    checksum: xxh3_64 of everything above, u64

A fetched value becomes KV only if every part verifies: the magic and version, the key it was
asked under, the expected tokens, the payload size the pool's layout implies, and the checksum.
Anything else (a collision, a truncated or corrupted value, another writer's format) is a
`CorruptPage`, which the tier counts as a miss.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

MAGIC = b"RKVP"
VERSION = 1
_HEADER = struct.Struct("<4sHHI16s")
_CHECK = struct.Struct("<Q")


class CorruptPage(ValueError):
    """A stored value failed verification (kind: 'format', 'key', 'tokens', 'size', 'checksum')."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def encode_page(key: bytes, tokens: np.ndarray, payload: bytes) -> bytes:
    toks = np.ascontiguousarray(tokens, dtype=np.int32).tobytes()
    body = _HEADER.pack(MAGIC, VERSION, 0, len(tokens), key) + toks + payload
    return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))


def decode_page(value: bytes, key: bytes, tokens: np.ndarray, payload_bytes: int) -> memoryview:
    """The verified payload of `value` (a view), or `CorruptPage`."""
    n = len(tokens)
    want = _HEADER.size + 4 * n + payload_bytes + _CHECK.size
    if len(value) < _HEADER.size + _CHECK.size:
        raise CorruptPage("size", f"value of {len(value)} bytes is too short")
    magic, version, _, n_tok, vkey = _HEADER.unpack_from(value, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptPage("format", f"not a radixkv page (magic {magic!r}, version {version})")
    if vkey != key:
        raise CorruptPage("key", "value stored under another key")
    if n_tok != n or len(value) != want:
        raise CorruptPage("size", f"{len(value)} bytes / {n_tok} tokens, expected {want} / {n}")
    (check,) = _CHECK.unpack_from(value, want - _CHECK.size)
    view = memoryview(value)
    if xxhash.xxh3_64_intdigest(view[:want - _CHECK.size]) != check:
        raise CorruptPage("checksum", "checksum mismatch")
    stored = np.frombuffer(value, dtype=np.int32, count=n, offset=_HEADER.size)
    if not np.array_equal(stored, tokens):
        raise CorruptPage("tokens", "page tokens differ (a hash collision)")
    start = _HEADER.size + 4 * n
    return view[start:start + payload_bytes]
