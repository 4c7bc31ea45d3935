"""Per-forward metadata shared by every layer of the model.

The engine builds one `ForwardContext` per forward pass and enters it with `forward_context(ctx)`;
the attention layers read it with `get_forward_context()`. This keeps the module signatures plain
(`model(input_ids)`), and the slot / indptr tensors are built once per batch instead of per layer.

Layout of a batch of B requests with N new tokens in total (CSR, as in `radixkv.attention`):
request b owns input rows qo_indptr[b]:qo_indptr[b+1] and reads the KV slots
kv_indices[kv_indptr[b]:kv_indptr[b+1]], which list its cached prefix and then its new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch

from radixkv.attention.shared_prefix import common_prefix_len
from radixkv.memory import TokenToKVPool


@dataclass(slots=True)
class ForwardContext:
    """Everything one forward pass needs besides the input ids. All tensors live on the model's
    device and are int64.

    - `is_decode`: True when every request has exactly one new token (decode kernel); False uses
      the extend kernel (prefill, prefill over a cached prefix, or mixed lengths).
    - `positions` [N]: absolute position of each input token (its index in its sequence).
    - `out_slots` [N]: KV slot each input token's K/V is written to.
    - `qo_indptr` [B+1]: new-token offsets per request (decode: arange(B+1)).
    - `kv_indptr` [B+1], `kv_indices` [nnz]: each request's slots, cached prefix then new tokens.
    - `logits_indices` [M]: rows of the N hidden states whose logits are returned.
    - `shared_prefix`: how many leading slots every request of a decode batch has in common
      (a shared system prompt; 0: none, or too short to matter), so attention can read them
      once for the whole batch (`radixkv.attention.shared_prefix`).
    """

    kv_pool: TokenToKVPool
    is_decode: bool
    positions: torch.Tensor
    out_slots: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    logits_indices: torch.Tensor
    shared_prefix: int = 0


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("radixkv_forward_context", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the context `get_forward_context()` returns inside the block (nestable)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def get_forward_context() -> ForwardContext:
    """The context of the enclosing `with forward_context(...)`; RuntimeError outside one."""
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("no forward context: call the model inside `with forward_context(ctx):`")
    return ctx


def make_forward_context(kv_pool: TokenToKVPool, *, starts: np.ndarray, ends: np.ndarray,
                         out_slots: torch.Tensor, kv_indptr: torch.Tensor,
                         kv_indices: torch.Tensor, logits: str | np.ndarray = "last",
                         is_decode: bool | None = None,
                         device: str | torch.device | None = None) -> ForwardContext:
    """The one place a `ForwardContext` is assembled (the engine's runner and the test helper
    below both come here).

    Request b computes positions starts[b] .. ends[b] - 1 (int64 numpy arrays [B]). `logits` is
    "last" (each request's last new token), "all" (every input row), or a bool mask [B] of the
    requests whose last row is returned. Positions are built without a loop over tokens.
    """
    lens = ends - starts  # [B]
    qo_indptr = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=qo_indptr[1:])
    # positions: start_b, start_b + 1, ... for each request
    positions = np.arange(qo_indptr[-1], dtype=np.int64) - np.repeat(qo_indptr[:-1] - starts, lens)
    if isinstance(logits, str):
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        rows = qo_indptr[1:] - 1 if logits == "last" else np.arange(qo_indptr[-1])
    else:
        rows = qo_indptr[1:][logits] - 1
    if is_decode is None:
        is_decode = bool((lens == 1).all())
    dev = torch.device(device) if device is not None else kv_pool.device
    shared = 0
    if is_decode and len(lens) > 1 and kv_indices.device.type == "cpu":
        shared = common_prefix_len(kv_indptr, kv_indices)
    return ForwardContext(
        kv_pool=kv_pool,
        is_decode=is_decode,
        positions=torch.from_numpy(positions).to(dev),
        out_slots=out_slots.to(dev),
        qo_indptr=torch.from_numpy(qo_indptr).to(dev),
        kv_indptr=kv_indptr.to(dev),
        kv_indices=kv_indices.to(dev),
        logits_indices=torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(dev),
        shared_prefix=shared,
    )


def build_forward_context(
    kv_pool: TokenToKVPool,
    new_slots: Sequence[torch.Tensor],
    cached_slots: Sequence[torch.Tensor] | None = None,
    logits: str = "last",
    is_decode: bool | None = None,
    device: str | torch.device | None = None,
) -> ForwardContext:
    """A context for a batch given each request's slots (a convenience for tests and benchmarks).

    Request b has cached KV in `cached_slots[b]` [c_b] (default: none) and writes its n_b new
    tokens to `new_slots[b]` [n_b]; its new tokens sit at positions c_b .. c_b + n_b - 1.
    `logits` is "last" (one row per request: its last new token) or "all" (every input row).
    `is_decode` defaults to "every request has exactly one new token". Tensors go to `device`
    (default: the pool's device).
    """
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    if not new_slots:
        raise ValueError("a forward needs at least one request")
    cached = list(cached_slots) if cached_slots is not None else [None] * len(new_slots)
    if len(cached) != len(new_slots):
        raise ValueError(f"{len(new_slots)} requests but {len(cached)} cached-slot lists")
    empty = torch.empty(0, dtype=torch.int64)
    cached_t = [empty if c is None else c.reshape(-1).to("cpu", torch.int64) for c in cached]
    new_t = [s.reshape(-1).to("cpu", torch.int64) for s in new_slots]
    if any(n.numel() == 0 for n in new_t):
        raise ValueError("every request needs at least one new token")
    starts = np.array([c.numel() for c in cached_t], dtype=np.int64)
    ends = starts + np.array([n.numel() for n in new_t], dtype=np.int64)
    kv_indptr = np.zeros(len(ends) + 1, dtype=np.int64)
    np.cumsum(ends, out=kv_indptr[1:])
    kv_indices = torch.cat([t for c, n in zip(cached_t, new_t, strict=True) for t in (c, n)])
    return make_forward_context(kv_pool, starts=starts, ends=ends, out_slots=torch.cat(new_t),
                                kv_indptr=torch.from_numpy(kv_indptr), kv_indices=kv_indices,
                                logits=logits, is_decode=is_decode, device=device)
