"""`NaiveCache`: the prefix cache that caches nothing, for A/B runs against `RadixCache`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from radixkv.errors import InvalidSlotError, LockError
from radixkv.memory.base_cache import (
    CacheNode,
    CacheStats,
    MatchResult,
    Namespace,
    PrefixCache,
    TokensLike,
    as_token_array,
)
from radixkv.memory.kv_pool import TokenToKVPool, as_slot_array

_EMPTY = torch.empty(0, dtype=torch.int64)


class _NoNode(CacheNode):
    """The only node a NaiveCache hands out: an empty root, never evicted; locks are counted."""

    __slots__ = ("children", "lock_ref", "parent")

    def __init__(self) -> None:
        self.parent = None
        self.children = {}
        self.lock_ref = 0


class NaiveCache(PrefixCache):
    """Same interface as `RadixCache`; every match is a miss and `insert` keeps nothing.

    `insert` adopts the slots of the sequence (as the radix tree would) and frees them at once, so
    callers follow one ownership protocol for both caches. A caller that still needs the KV of a
    running request must therefore only insert it when the request is done.
    """

    retains_slots = False

    def __init__(self, kv_pool: TokenToKVPool, page_size: int = 1) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.kv_pool = kv_pool
        self.page_size = page_size
        self._root = _NoNode()
        self.clear()

    def clear(self) -> None:
        """Zero the counters (nothing is cached)."""
        self._query = self._inserted = 0

    def match_prefix(self, tokens: TokensLike, namespace: Namespace = None, *,
                     record: bool = True) -> MatchResult:
        """Always a miss: length 0."""
        if record:
            self._query += len(as_token_array(tokens))
        return MatchResult(_EMPTY, self._root, 0)

    def insert(self, tokens: TokensLike, slots: Any, namespace: Namespace = None) -> int:
        """Frees the page-aligned part's slots (the tree's share) and returns 0 (nothing cached)."""
        toks = as_token_array(tokens)
        arr = as_slot_array(slots)
        if len(arr) != len(toks):
            raise InvalidSlotError(f"insert: {len(toks)} tokens but {len(arr)} slots")
        n = len(toks) // self.page_size * self.page_size
        self.kv_pool.free(arr[:n])
        self._inserted += n
        return 0

    def lock(self, node: CacheNode) -> None:
        node.lock_ref += 1

    def unlock(self, node: CacheNode) -> None:
        if node.lock_ref <= 0:
            raise LockError("unlock of a node that is not locked")
        node.lock_ref -= 1

    def evict(self, num_tokens: int) -> int:
        """Nothing is cached, so nothing can be evicted."""
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def stats(self) -> CacheStats:
        """Queries and inserts are counted; an insert is dropped at once, so nothing is ever
        evicted."""
        return CacheStats(self._query, 0, 0, self._inserted, 0, 0, 0, 0)

    def walk(self) -> Iterator[tuple[CacheNode, int]]:
        return iter(())

    def roots(self) -> dict[Namespace, CacheNode]:
        return {}

    def check_invariants(self) -> None:
        """Nothing to check beyond the lock count."""
        assert self._root.lock_ref >= 0

    def cached_slots(self) -> np.ndarray:
        """Nothing is cached."""
        return np.empty(0, dtype=np.int64)
