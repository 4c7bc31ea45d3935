"""The prefix-cache interface shared by `RadixCache` and its no-op twin `NaiveCache`.

Slot ownership (who frees what):

| range of a request's slots                  | owner        | freed by                         |
|---------------------------------------------|--------------|----------------------------------|
| [0, match.length) from match_prefix         | the tree     | eviction, once unlocked          |
| [match.length, k) where k = insert(...)     | the caller   | the caller (duplicates of cache) |
| [k, len(inserted tokens))                   | the tree     | eviction (NaiveCache: at once)   |
| beyond the inserted, page-aligned part      | the caller   | the caller                       |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

Namespace = Any  # any hashable; None is a namespace of its own
TokensLike = np.ndarray | torch.Tensor | list[int] | tuple[int, ...]


@dataclass(slots=True, frozen=True)
class MatchResult:
    """Longest cached prefix of a token sequence.

    `slots` is a CPU int64 tensor of the KV slots of that prefix, `length == len(slots)`, and
    `node` is an opaque handle to pass to `lock` / `unlock` (the node ends exactly at `length`).
    """

    slots: torch.Tensor
    node: Any
    length: int


@dataclass(slots=True, frozen=True)
class CacheStats:
    """Counters since construction or `reset()`."""

    query_tokens: int
    hit_tokens: int
    evicted_tokens: int
    inserted_tokens: int
    node_count: int
    total_size: int
    evictable_size: int
    protected_size: int

    @property
    def hit_rate(self) -> float:
        """Hit tokens / query tokens over all `match_prefix` calls (0.0 before any query)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def as_token_array(tokens: TokensLike) -> np.ndarray:
    """Tokens as a contiguous 1-D int32 numpy array (zero-copy when already one)."""
    if (type(tokens) is np.ndarray and tokens.dtype == np.int32 and tokens.ndim == 1
            and tokens.flags.c_contiguous):
        return tokens
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype != np.int32:
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


class PrefixCache(Protocol):
    """What the engine needs from a prefix cache. See the module docstring for slot ownership."""

    page_size: int

    def match_prefix(self, tokens: TokensLike, namespace: Namespace = None, *,
                     record: bool = True) -> MatchResult: ...
    def insert(self, tokens: TokensLike, slots: Any, namespace: Namespace = None) -> int: ...
    def lock(self, node: Any) -> None: ...
    def unlock(self, node: Any) -> None: ...
    def evict(self, num_tokens: int) -> int: ...
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def total_size(self) -> int: ...
    def stats(self) -> CacheStats: ...
    def reset(self) -> None: ...
    def check_invariants(self) -> None: ...
