"""Content addresses of tier pages: a hash chain over token pages, seeded per model and tenant.

key(page 0) = xxh128(seed || tokens of page 0), key(page i) = xxh128(key(page i-1) || tokens of
page i). A key therefore names a page *and everything before it*, so a hit on page i implies the
whole prefix matches (the value also carries its tokens, which the reader checks). The seed mixes
a fingerprint of the model weights, the KV dtype and layout, and the namespace (cache_salt), so two
tenants or two models never share an entry.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import torch
import xxhash

KEY_BYTES = 16


def weights_fingerprint(model: torch.nn.Module) -> bytes:
    """xxh128 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = xxhash.xxh3_128()
    state = model.state_dict()
    # A module may keep its weight only in a kernel's packed layout (`packed`, an opaque tensor
    # with `to_dense()`; `weight` is then a shape-only meta tensor): the dense values are hashed,
    # so processes with and without packing (other CPUs, other builds) agree.
    packed = {f"{prefix}.weight" if prefix else "weight": mod.packed
              for prefix, mod in model.named_modules()
              if getattr(mod, "packed", None) is not None}
    for name in sorted(state):
        t = packed[name].to_dense() if name in packed else state[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.digest()


def layout_fingerprint(pool_layout: str, kv_dtype: str, page_tokens: int) -> bytes:
    """What the stored bytes mean: the pool's buffer layout, the KV dtype, the tier page size."""
    return xxhash.xxh3_128(f"{pool_layout}|{kv_dtype}|{page_tokens}".encode()).digest()


def namespace_bytes(namespace: Hashable) -> bytes:
    """A stable encoding of a namespace across processes (None, str, int, bytes, tuples)."""
    if namespace is None or isinstance(namespace, str | int | bytes | bool | float):
        return f"{type(namespace).__name__}:{namespace!r}".encode()
    if isinstance(namespace, tuple):
        return b"(" + b",".join(namespace_bytes(x) for x in namespace) + b")"
    raise TypeError(f"namespace {namespace!r} has no stable encoding for a shared KV tier; use "
                    "a str, int, bytes, None or a tuple of those")


def chain_seed(model_fp: bytes, layout_fp: bytes, namespace: Hashable) -> bytes:
    return xxhash.xxh3_128(model_fp + layout_fp + namespace_bytes(namespace)).digest()


def page_keys(seed: bytes, tokens: np.ndarray, page_tokens: int, num_pages: int | None = None,
              prev: bytes | None = None, first_page: int = 0) -> list[bytes]:
    """Keys of the full pages of `tokens` (int32), from `first_page` on.

    `prev` is the key of page first_page - 1 when the caller already has it (else the chain is
    recomputed from the start, which costs one xxh128 of the earlier tokens per page).
    """
    toks = np.ascontiguousarray(tokens, dtype=np.int32)
    total = len(toks) // page_tokens
    end = total if num_pages is None else min(total, first_page + num_pages)
    start = 0 if prev is None else first_page
    key = seed if prev is None else prev
    out: list[bytes] = []
    for i in range(start, end):
        key = xxhash.xxh3_128(key + toks[i * page_tokens:(i + 1) * page_tokens].tobytes()).digest()
        if i >= first_page:
            out.append(key)
    return out
