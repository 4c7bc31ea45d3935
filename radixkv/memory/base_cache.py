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

import abc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Namespace = Any  # any hashable; None is a namespace of its own
TokensLike = np.ndarray | torch.Tensor | list[int] | tuple[int, ...]


class CacheNode:
    """The node handle a prefix cache hands out (`MatchResult.node`): pass it back to `lock` /
    `unlock`. Read-only for callers: `parent` is None at a namespace root, `children` maps a
    child key to its node, `lock_ref` counts the requests that pin it, `namespace` is the
    tenant whose tree it belongs to."""

    __slots__ = ()
    parent: CacheNode | None
    children: Mapping[Any, CacheNode]
    lock_ref: int
    namespace: Namespace


@dataclass(slots=True, frozen=True)
class MatchResult:
    """Longest cached prefix of a token sequence.

    `slots` is a CPU int64 tensor of the KV slots of that prefix, `length == len(slots)`, and
    `node` is an opaque handle to pass to `lock` / `unlock` (the node ends exactly at `length`).
    """

    slots: torch.Tensor
    node: CacheNode
    length: int


@dataclass(slots=True, frozen=True)
class CacheStats:
    """Counters since construction or `clear()`."""

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


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Number of leading positions on which int arrays `a` and `b` agree (one vectorised scan)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache(abc.ABC):
    """What the engine needs from a prefix cache. See the module docstring for slot ownership.

    `RadixCache` implements it with a radix tree; `NaiveCache` is its no-op twin (every match a
    miss, inserted slots freed at once) for A/B runs.
    """

    page_size: int
    #: True when inserted KV stays cached (and so may be shared while its request still runs).
    #: A cache that keeps nothing frees what it is given, so callers insert only finished KV.
    retains_slots: bool = False

    @abc.abstractmethod
    def match_prefix(self, tokens: TokensLike, namespace: Namespace = None, *,
                     record: bool = True) -> MatchResult:
        """Longest cached, page-aligned prefix of `tokens`; `record=False` leaves stats alone."""

    @abc.abstractmethod
    def insert(self, tokens: TokensLike, slots: Any, namespace: Namespace = None) -> int:
        """Adopt the page-aligned part of (tokens, slots); returns how much was cached before."""

    @abc.abstractmethod
    def lock(self, node: CacheNode) -> None:
        """Pin `node` and its ancestors against eviction."""

    @abc.abstractmethod
    def unlock(self, node: CacheNode) -> None:
        """Undo one `lock`; raises `LockError` when not locked."""

    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` unlocked cached tokens if possible; returns tokens freed."""

    @abc.abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens no request pins."""

    @abc.abstractmethod
    def protected_size(self) -> int:
        """Cached tokens pinned by running requests."""

    @abc.abstractmethod
    def total_size(self) -> int:
        """Every cached token (== slots the cache holds)."""

    @abc.abstractmethod
    def stats(self) -> CacheStats:
        """Counters since construction or `clear()`."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop everything cached (slots back to the pool) and zero the counters."""

    def reset(self) -> None:
        """Old name of `clear()`."""
        self.clear()

    @abc.abstractmethod
    def walk(self) -> Iterator[tuple[CacheNode, int]]:
        """Every non-root node with its depth (1 = child of a root), depth first."""

    @abc.abstractmethod
    def roots(self) -> dict[Namespace, CacheNode]:
        """The root of each namespace that holds something."""

    @abc.abstractmethod
    def cached_slots(self) -> np.ndarray:
        """Every slot the cache holds (int64)."""

    @abc.abstractmethod
    def check_invariants(self) -> None:
        """Raise `InvariantError` if the cache or its pool accounting is inconsistent."""
