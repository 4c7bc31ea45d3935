"""RadixCache and NaiveCache unit tests, each against a hand-worked case or an invariant."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_no_leak, path_of

from radixkv.errors import InvalidSlotError, InvariantError, LockError, RadixKVError
from radixkv.memory import NaiveCache, RadixCache, TokenToKVPool, TreeNode


def make(num_slots: int = 64, page_size: int = 1,
         policy: str = "lru") -> tuple[TokenToKVPool, RadixCache]:
    pool = TokenToKVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1)
    return pool, RadixCache(pool, page_size=page_size, eviction_policy=policy)


def put(pool: TokenToKVPool, cache: Any, tokens: Sequence[int],
        namespace: Hashable = None) -> tuple[list[int], int]:
    """Insert `tokens` with fresh slots, free the caller's share; returns (all slots, insert())."""
    slots = pool.alloc(len(tokens))
    k = cache.insert(list(tokens), slots, namespace)
    n = len(tokens) // cache.page_size * cache.page_size
    pool.free(torch.cat([slots[:k], slots[n:]]))
    return slots.tolist(), k




def contents(cache: RadixCache) -> dict[tuple[Hashable, tuple[int, ...]], int]:
    """(namespace, prefix) -> slot of the prefix's last token, for every cached token.

    Independent of how the tree happens to cut its nodes: two trees with the same contents cache
    the same prefixes with the same KV.
    """
    out = {}
    for node, _ in cache.walk():
        path = path_of(node)
        start = len(path) - len(node)
        for i, slot in enumerate(node.value.tolist()):
            key = (node.namespace, path[:start + i + 1])
            assert key not in out, "a prefix is cached twice"
            out[key] = slot
    return out


def structure(cache: RadixCache) -> list[tuple[Any, ...]]:
    """Node-level view: (namespace, path, node length, lock count), sorted."""
    return sorted(((repr(n.namespace), path_of(n), len(n), n.lock_ref) for n, _ in cache.walk()))


def snapshot(pool: TokenToKVPool, cache: RadixCache) -> tuple[Any, ...]:
    """Everything a failed call must leave as it was."""
    return (contents(cache), structure(cache), pool.available_size(), cache.total_size(),
            cache.evictable_size(), cache.protected_size(), cache.stats().node_count)


def check(pool: TokenToKVPool, cache: Any, held: Any = ()) -> None:
    cache.check_invariants()
    assert cache.evictable_size() + cache.protected_size() == cache.total_size()
    assert_no_leak(pool, cache, held)


# ---- construction ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"page_size": 0}, {"page_size": -2},
                                    {"eviction_policy": "fifo"}])
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    pool = TokenToKVPool(4, 1, 1, 1)
    with pytest.raises(ValueError):
        RadixCache(pool, **kwargs)


def test_empty_cache_misses() -> None:
    pool, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 0 and m.slots.dtype == torch.int64 and m.slots.numel() == 0
    cache.lock(m.node)  # the handle of a miss can be locked and unlocked like any other
    cache.unlock(m.node)
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    assert cache.match_prefix([]).length == 0
    check(pool, cache)


# ---- match / insert ----------------------------------------------------------------------------
def test_insert_then_match_returns_the_inserted_slots() -> None:
    pool, cache = make()
    slots, k = put(pool, cache, [5, 6, 7, 8])
    assert k == 0
    m = cache.match_prefix([5, 6, 7, 8])
    assert m.length == 4 and m.slots.tolist() == slots
    assert m.slots.dtype == torch.int64
    longer = cache.match_prefix([5, 6, 7, 8, 9, 10])
    assert longer.length == 4 and longer.slots.tolist() == slots
    assert cache.match_prefix([6, 7]).length == 0  # a prefix match, not a substring match
    assert cache.total_size() == 4
    check(pool, cache)


@pytest.mark.parametrize("kind", ["list", "tuple", "np64", "np32", "torch64", "torch32"])
def test_token_and_slot_input_types_agree(kind: str) -> None:
    conv = {"list": list, "tuple": tuple, "np64": lambda x: np.asarray(x, dtype=np.int64),
            "np32": lambda x: np.asarray(x, dtype=np.int32),
            "torch64": lambda x: torch.tensor(x, dtype=torch.int64),
            "torch32": lambda x: torch.tensor(x, dtype=torch.int32)}[kind]
    pool, cache = make()
    slots = pool.alloc(3)
    assert cache.insert(conv([1, 2, 3]), conv(slots.tolist())) == 0
    m = cache.match_prefix(conv([1, 2, 3, 4]))
    assert m.length == 3 and m.slots.tolist() == slots.tolist()
    check(pool, cache)


def test_partial_match_splits_the_node_at_the_match_end() -> None:
    pool, cache = make()
    slots, _ = put(pool, cache, [1, 2, 3, 4, 5])
    assert cache.stats().node_count == 1
    m = cache.match_prefix([1, 2, 3, 9, 9])
    assert m.length == 3 and m.slots.tolist() == slots[:3]
    assert path_of(m.node) == (1, 2, 3)  # the handle ends exactly at the match
    assert len(m.node) == 3
    assert cache.stats().node_count == 2
    assert structure(cache) == [("None", (1, 2, 3), 3, 0), ("None", (1, 2, 3, 4, 5), 2, 0)]
    # The split changes no cached content.
    full = cache.match_prefix([1, 2, 3, 4, 5])
    assert full.length == 5 and full.slots.tolist() == slots
    short = cache.match_prefix([1, 2])  # a query ending inside a node splits it as well
    assert short.length == 2 and path_of(short.node) == (1, 2)
    assert cache.stats().node_count == 3
    check(pool, cache)


def test_insert_return_value_is_the_length_cached_before() -> None:
    pool, cache = make()
    a, k = put(pool, cache, [1, 2, 3])
    assert k == 0
    b, k = put(pool, cache, [1, 2, 3, 4, 5])
    assert k == 3
    _, k = put(pool, cache, [1, 2])  # fully cached already: adds nothing
    assert k == 2 and cache.total_size() == 5
    c, k = put(pool, cache, [1, 2, 9])  # diverges inside the node [1, 2, 3]
    assert k == 2 and cache.total_size() == 6
    _, k = put(pool, cache, [7])
    assert k == 0
    assert cache.insert([], torch.empty(0, dtype=torch.int64)) == 0
    # The tree kept its first slots for the shared positions and adopted only the new suffixes.
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == a + b[3:]
    assert cache.match_prefix([1, 2, 9]).slots.tolist() == a[:2] + c[2:]
    assert cache.total_size() == 7
    check(pool, cache)


def test_insert_adopts_only_the_new_suffix_and_the_rest_stays_the_callers() -> None:
    pool, cache = make(num_slots=10)
    first = pool.alloc(2)
    assert cache.insert([1, 2], first) == 0
    mine = pool.alloc(4)
    assert cache.insert([1, 2, 3, 4], mine) == 2
    cached = set(cache.cached_slots().tolist())
    assert cached == set(first.tolist()) | set(mine[2:].tolist())
    # mine[:2] are still allocated and the caller's: no leak if they are counted as held...
    check(pool, cache, held=mine[:2])
    pool.free(mine[:2])  # ...and the caller can free them: the tree does not hold them
    check(pool, cache)


def test_insert_with_the_trees_own_slots_for_the_cached_prefix() -> None:
    """The engine's flow: match, allocate the rest, insert match slots + new slots."""
    pool, cache = make(num_slots=10)
    put(pool, cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3, 4, 5])
    cache.lock(m.node)
    new = pool.alloc(2)
    k = cache.insert([1, 2, 3, 4, 5], torch.cat([m.slots, new]))
    assert k == 3
    cache.unlock(m.node)
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == m.slots.tolist() + new.tolist()
    check(pool, cache)


def test_match_result_does_not_alias_the_tree() -> None:
    pool, cache = make()
    slots, _ = put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 2, 3, 4])
    for query in ([1, 2, 3], [1, 2, 3, 4]):
        m = cache.match_prefix(query)
        m.slots.fill_(0)
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == slots
    check(pool, cache)


def test_insert_copies_the_callers_arrays() -> None:
    pool, cache = make()
    toks = np.array([1, 2, 3], dtype=np.int32)
    slots = pool.alloc(3)
    sl_np = slots.numpy().copy()
    cache.insert(toks, sl_np)
    toks[:] = 7
    sl_np[:] = 0
    m = cache.match_prefix([1, 2, 3])
    assert m.length == 3 and m.slots.tolist() == slots.tolist()
    assert cache.match_prefix([7, 7, 7]).length == 0
    check(pool, cache)


@pytest.mark.parametrize("case", ["len_mismatch", "slot0", "free_slot", "past_end", "negative",
                                  "float_slots"])
def test_bad_insert_raises_and_changes_nothing(case: str) -> None:
    pool, cache = make(num_slots=12)
    put(pool, cache, [1, 2, 3])
    held = pool.alloc(4)
    h = held.tolist()
    free_slot = int(np.flatnonzero(pool.is_free(np.arange(1, 13)))[0]) + 1
    toks, slots = {
        "len_mismatch": ([1, 2, 3, 4, 5], h),
        "slot0": ([1, 2, 4, 5], [h[0], h[1], 0, h[2]]),
        "free_slot": ([1, 2, 4, 5], [h[0], h[1], free_slot, h[2]]),
        "past_end": ([4, 5], [h[0], 13]),
        "negative": ([4, 5], [h[0], -3]),
        "float_slots": ([4, 5], np.array([1.0, 2.0])),
    }[case]
    before = snapshot(pool, cache)
    with pytest.raises(InvalidSlotError):
        cache.insert(toks, slots)
    assert snapshot(pool, cache) == before
    check(pool, cache, held)


def test_insert_rejects_negative_slots_when_the_pool_is_full() -> None:
    """A negative slot must not pass as the pool's last slot (numpy wraps negative indices)."""
    pool, cache = make(num_slots=4)
    held = pool.alloc(4)
    before = snapshot(pool, cache)
    with pytest.raises(InvalidSlotError):
        cache.insert([1, 2], [int(held[0]), -1])
    assert snapshot(pool, cache) == before
    check(pool, cache, held)


def test_free_mixing_own_and_cache_held_slots_frees_nothing() -> None:
    """Slots the tree adopted are the tree's: freeing one through the pool is a double owner."""
    pool, cache = make(num_slots=8)
    a, _ = put(pool, cache, [1, 2, 3])
    mine = pool.alloc(2)
    before = snapshot(pool, cache)
    with pytest.raises(InvalidSlotError):
        pool.free([a[1]])
    with pytest.raises(InvalidSlotError):
        pool.free(torch.cat([mine, torch.tensor([a[0]])]))  # nothing freed, not even `mine`
    assert snapshot(pool, cache) == before
    check(pool, cache, held=mine)
    assert cache.evict(3) == 3  # once evicted they are free again, and the pool agrees
    check(pool, cache, held=mine)


def test_failed_insert_in_a_new_namespace_leaves_no_trace() -> None:
    pool, cache = make(num_slots=8)
    put(pool, cache, [1, 2])
    before = (snapshot(pool, cache), set(cache.roots()))
    with pytest.raises(InvalidSlotError):
        cache.insert([1, 2], [0, 0], namespace="new")
    assert (snapshot(pool, cache), set(cache.roots())) == before
    check(pool, cache)


def test_match_with_record_false_leaves_the_counters() -> None:
    pool, cache = make()
    slots, _ = put(pool, cache, [1, 2, 3])
    cache.match_prefix([1, 2, 3])
    s0 = cache.stats()
    m = cache.match_prefix([1, 2, 3, 4], record=False)
    assert m.length == 3 and m.slots.tolist() == slots
    s1 = cache.stats()
    assert (s1.query_tokens, s1.hit_tokens) == (s0.query_tokens, s0.hit_tokens)
    check(pool, cache)


# ---- page alignment --------------------------------------------------------------------------
def test_page_aligned_insert_and_match() -> None:
    pool, cache = make(page_size=4)
    toks = list(range(10, 20))  # 10 tokens: two whole pages and a 2-token tail
    slots = pool.alloc(10)
    assert cache.insert(toks, slots) == 0
    assert cache.total_size() == 8
    assert set(cache.cached_slots().tolist()) == set(slots[:8].tolist())
    check(pool, cache, held=slots[8:])  # the unaligned tail stays the caller's
    pool.free(slots[8:])
    m = cache.match_prefix(toks)
    assert m.length == 8 and m.slots.tolist() == slots[:8].tolist()
    for q_len, want in [(0, 0), (3, 0), (4, 4), (7, 4), (8, 8), (9, 8)]:
        m = cache.match_prefix(toks[:q_len])
        assert m.length == want and m.length <= q_len
        assert m.slots.tolist() == slots[:want].tolist()
    # A mismatch inside the second page: only the first page matches.
    m = cache.match_prefix(toks[:6] + [0, 0])
    assert m.length == 4 and path_of(m.node) == tuple(toks[:4])
    # A mismatch inside the first page: no match at all.
    assert cache.match_prefix([10, 11, 0, 13]).length == 0
    for node, _ in cache.walk():
        assert len(node) % 4 == 0
    check(pool, cache)


def test_page_aligned_insert_divergence_mid_page() -> None:
    pool, cache = make(page_size=2)
    a, _ = put(pool, cache, [1, 2, 3, 4, 5, 6])
    b, k = put(pool, cache, [1, 2, 3, 9, 5, 6])  # diverges in page 2: pages 2..3 are new
    assert k == 2
    assert cache.match_prefix([1, 2, 3, 9, 5, 6]).slots.tolist() == a[:2] + b[2:]
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).slots.tolist() == a
    _, k = put(pool, cache, [1, 2, 3])  # only one whole page, already cached
    assert k == 2
    _, k = put(pool, cache, [8])  # no whole page: nothing stored, 0 returned
    assert k == 0 and cache.match_prefix([8, 8]).length == 0
    assert cache.total_size() == 10
    for node, _ in cache.walk():
        assert len(node) % 2 == 0
    check(pool, cache)


# ---- namespaces --------------------------------------------------------------------------------
def test_namespaces_are_isolated() -> None:
    pool, cache = make()
    none_slots, _ = put(pool, cache, [1, 2, 3])
    for ns in ("a", 0, ""):  # None, 0 and "" are three different tenants
        assert cache.match_prefix([1, 2, 3], namespace=ns).length == 0
    a_slots, k = put(pool, cache, [1, 2, 3, 4], namespace="a")
    assert k == 0  # nothing of tenant None is reused
    zero_slots, k = put(pool, cache, [1, 2], namespace=0)
    assert k == 0
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == none_slots
    assert cache.match_prefix([1, 2, 3, 4], namespace="a").slots.tolist() == a_slots
    assert cache.match_prefix([1, 2, 3, 4], namespace=0).slots.tolist() == zero_slots
    assert cache.total_size() == 9
    check(pool, cache)


def test_evicting_one_namespace_leaves_the_other() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2], namespace="a")
    keep, _ = put(pool, cache, [1, 2], namespace="b")
    m = cache.match_prefix([1, 2], namespace="b")
    cache.lock(m.node)
    assert cache.evict(100) == 2  # only tenant a's node was unlocked
    assert cache.match_prefix([1, 2], namespace="a").length == 0
    assert cache.match_prefix([1, 2], namespace="b").slots.tolist() == keep
    # The emptied tenant can be filled again.
    _, k = put(pool, cache, [1, 2, 3], namespace="a")
    assert k == 0 and cache.match_prefix([1, 2, 3], namespace="a").length == 3
    cache.unlock(m.node)
    check(pool, cache)


# ---- lock / unlock ---------------------------------------------------------------------------
def test_lock_propagates_to_the_root_and_is_counted() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    put(pool, cache, [1, 2, 5, 6])  # nodes: [1,2] -> [3,4], [5,6]
    m = cache.match_prefix([1, 2, 3, 4])
    assert m.length == 4
    cache.lock(m.node)
    assert structure(cache) == [("None", (1, 2), 2, 1), ("None", (1, 2, 3, 4), 2, 1),
                                ("None", (1, 2, 5, 6), 2, 0)]
    assert cache.protected_size() == 4 and cache.evictable_size() == 2
    cache.lock(m.node)
    m2 = cache.match_prefix([1, 2, 5, 6])
    cache.lock(m2.node)
    assert structure(cache) == [("None", (1, 2), 2, 3), ("None", (1, 2, 3, 4), 2, 2),
                                ("None", (1, 2, 5, 6), 2, 1)]
    assert cache.protected_size() == 6 and cache.evictable_size() == 0
    check(pool, cache)
    cache.unlock(m.node)
    cache.unlock(m2.node)
    assert cache.protected_size() == 4
    cache.unlock(m.node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    assert all(n.lock_ref == 0 for n, _ in cache.walk())
    check(pool, cache)


def test_split_of_a_locked_node_keeps_the_lock_on_both_halves() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    short = cache.match_prefix([1, 2])  # splits the locked node
    assert structure(cache) == [("None", (1, 2), 2, 1), ("None", (1, 2, 3, 4), 2, 1)]
    assert cache.protected_size() == 4
    check(pool, cache)
    cache.unlock(m.node)  # the handle still ends at 4 and unlocks the whole path
    assert cache.protected_size() == 0
    assert short.node.lock_ref == 0
    check(pool, cache)


def test_unlock_below_zero_raises_and_changes_nothing() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    before = snapshot(pool, cache)
    with pytest.raises(LockError):
        cache.unlock(m.node)
    assert snapshot(pool, cache) == before
    cache.lock(m.node)
    cache.unlock(m.node)
    with pytest.raises(LockError):
        cache.unlock(m.node)
    assert snapshot(pool, cache) == before
    assert issubclass(LockError, RadixKVError)
    check(pool, cache)


def test_lock_of_an_evicted_node_raises() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2])
    m = cache.match_prefix([1, 2])
    assert cache.evict(2) == 2
    before = snapshot(pool, cache)
    with pytest.raises(LockError):
        cache.lock(m.node)
    with pytest.raises(LockError):
        cache.unlock(m.node)
    assert snapshot(pool, cache) == before
    check(pool, cache)


# ---- eviction --------------------------------------------------------------------------------
def test_evict_lru_order() -> None:
    pool, cache = make()
    a, _ = put(pool, cache, [1, 1])
    b, _ = put(pool, cache, [2, 2])
    c, _ = put(pool, cache, [3, 3])
    cache.match_prefix([1, 1])  # a is now the most recent, b the least
    free_before = pool.available_size()
    assert cache.evict(1) == 2  # whole nodes: asked for 1 token, freed the 2-token node b
    assert pool.available_size() == free_before + 2
    assert pool.is_free(np.array(b)).all()
    assert cache.match_prefix([2, 2]).length == 0
    assert cache.match_prefix([3, 3]).length == 2  # ...which makes c the most recent
    assert cache.evict(2) == 2
    assert cache.match_prefix([1, 1]).length == 0
    assert cache.match_prefix([3, 3]).slots.tolist() == c
    assert cache.stats().evicted_tokens == 4
    check(pool, cache)


def test_evict_lru_counts_insert_as_a_use() -> None:
    pool, cache = make()
    put(pool, cache, [1, 1])
    put(pool, cache, [2, 2])
    put(pool, cache, [1, 1])  # re-inserting a cached sequence refreshes it
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1]).length == 2 and cache.match_prefix([2, 2]).length == 0
    check(pool, cache)


def test_parent_becomes_evictable_after_its_last_child() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 2, 4])  # nodes: [1,2] -> [3], [4]
    put(pool, cache, [7, 7, 7])
    cache.match_prefix([7, 7, 7])  # [7,7,7] is the most recent leaf
    # LRU leaves are [3] and [4]; once both are gone [1,2] (older than [7,7,7]) goes next.
    assert cache.evict(3) == 4
    assert cache.match_prefix([1, 2, 3]).length == 0
    assert cache.match_prefix([7, 7, 7]).length == 3
    assert cache.stats().node_count == 1
    check(pool, cache)


def test_evict_never_touches_a_locked_path() -> None:
    pool, cache = make()
    shared, _ = put(pool, cache, [1, 2, 3, 4])
    put(pool, cache, [1, 2, 9, 9])
    put(pool, cache, [5, 5])
    m = cache.match_prefix([1, 2, 3, 4])
    cache.lock(m.node)
    assert cache.evict(1000) == 4  # [9,9] and [5,5]; [1,2] -> [3,4] is locked
    assert cache.evictable_size() == 0 and cache.protected_size() == 4
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == shared
    assert cache.evict(1000) == 0
    cache.unlock(m.node)
    assert cache.evict(1000) == 4
    assert cache.total_size() == 0
    check(pool, cache)


def test_lock_of_an_inner_node_leaves_its_subtree_evictable() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2])  # split: [1,2] -> [3,4]
    cache.lock(m.node)
    assert cache.evictable_size() == 2 and cache.protected_size() == 2
    assert cache.evict(10) == 2
    assert cache.match_prefix([1, 2, 3, 4]).length == 2
    cache.unlock(m.node)
    check(pool, cache)


def test_evict_stops_when_nothing_is_left_and_zero_is_a_no_op() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    before = snapshot(pool, cache)
    assert cache.evict(0) == 0
    assert snapshot(pool, cache) == before
    assert cache.evict(50) == 3
    assert cache.evict(50) == 0
    assert cache.total_size() == 0 and pool.available_size() == 64
    check(pool, cache)


def test_evict_inside_a_free_group() -> None:
    pool, cache = make(num_slots=8)
    a, _ = put(pool, cache, [1, 2, 3])
    held = pool.alloc(5)
    with pool.free_group():
        assert cache.evict(3) == 3
        pool.free(held[:2])
    assert pool.available_size() == 5
    check(pool, cache, held=held[2:])
    assert set(pool.alloc(5).tolist()) == set(a) | set(held[:2].tolist())


def test_lfu_evicts_the_least_hit_leaf_first() -> None:
    pool, cache = make(policy="lfu")
    put(pool, cache, [1, 1])
    put(pool, cache, [2, 2])
    put(pool, cache, [3, 3])
    for _ in range(3):
        cache.match_prefix([1, 1])
    cache.match_prefix([2, 2])
    cache.match_prefix([3, 3])  # the most recent; LRU would evict [1,1]
    cache.match_prefix([3, 3])
    assert cache.evict(1) == 2  # [2,2]: one hit
    assert cache.match_prefix([2, 2]).length == 0
    # [1,1] has 3 hits, [3,3] 2 (the miss on [2,2] above touched nothing)
    assert cache.evict(1) == 2
    assert cache.match_prefix([3, 3]).length == 0
    assert cache.match_prefix([1, 1]).length == 2
    check(pool, cache)


def test_lfu_ties_are_broken_by_recency() -> None:
    pool, cache = make(policy="lfu")
    put(pool, cache, [1])
    put(pool, cache, [2])
    cache.match_prefix([2])
    cache.match_prefix([1])  # one hit each; [2] is older
    assert cache.evict(1) == 1
    assert cache.match_prefix([2]).length == 0 and cache.match_prefix([1]).length == 1
    check(pool, cache)


# ---- stats / reset ---------------------------------------------------------------------------
def test_stats_count_queries_hits_evictions_and_nodes() -> None:
    pool, cache = make()
    assert cache.stats().hit_rate == 0.0
    put(pool, cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5, 6])  # 6 queried, 4 hit
    cache.match_prefix([1, 2, 9, 9])  # 4 queried, 2 hit (splits)
    cache.match_prefix([8])  # 1 queried, 0 hit
    s = cache.stats()
    assert (s.query_tokens, s.hit_tokens) == (11, 6)
    assert s.hit_rate == pytest.approx(6 / 11)
    assert s.node_count == 2 == len(list(cache.walk()))
    assert (s.total_size, s.evictable_size, s.protected_size) == (4, 4, 0)
    assert s.evicted_tokens == 0
    cache.evict(1)
    assert cache.stats().evicted_tokens == 2 and cache.stats().node_count == 1


def test_stats_count_page_unaligned_queries() -> None:
    pool, cache = make(page_size=2)
    put(pool, cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3])  # 3 queried, 2 hit
    s = cache.stats()
    assert (s.query_tokens, s.hit_tokens) == (3, 2)


def test_reset_frees_everything_and_zeroes_counters() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 5], namespace="x")
    cache.match_prefix([1, 2])
    cache.reset()
    assert pool.available_size() == 64
    assert cache.total_size() == 0 and list(cache.walk()) == []
    s = cache.stats()
    assert (s.query_tokens, s.hit_tokens, s.evicted_tokens, s.node_count) == (0, 0, 0, 0)
    assert cache.match_prefix([1, 2, 3]).length == 0
    _, k = put(pool, cache, [1, 2, 3])
    assert k == 0
    check(pool, cache)


def test_reset_while_locked_raises_and_changes_nothing() -> None:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    before = snapshot(pool, cache)
    with pytest.raises(LockError):
        cache.reset()
    assert snapshot(pool, cache) == before
    cache.unlock(m.node)
    check(pool, cache)


# ---- check_invariants detects corruption ------------------------------------------------------
def _two_branch_cache() -> tuple[TokenToKVPool, RadixCache]:
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    put(pool, cache, [1, 2, 4])
    cache.check_invariants()
    return pool, cache


def _node(cache: RadixCache, path: tuple[int, ...]) -> TreeNode:
    return next(n for n, _ in cache.walk() if path_of(n) == path)


def test_check_invariants_catches_a_slot_freed_behind_its_back() -> None:
    pool, cache = _two_branch_cache()
    # corrupt on purpose: the public free() refuses slots the cache holds
    pool._release(np.array([int(_node(cache, (1, 2, 3)).value[0])]))
    with pytest.raises(InvariantError):
        cache.check_invariants()


def test_check_invariants_catches_a_slot_held_twice() -> None:
    pool, cache = _two_branch_cache()
    a, b = _node(cache, (1, 2, 3)), _node(cache, (1, 2, 4))
    pool._release(np.array([int(b.value[0])]))  # corrupt on purpose, behind the pool's checks
    b.value[0] = a.value[0]
    with pytest.raises(InvariantError):
        cache.check_invariants()


def test_check_invariants_catches_key_slot_length_mismatch() -> None:
    _, cache = _two_branch_cache()
    node = _node(cache, (1, 2))
    node.value = node.value[:1]
    with pytest.raises(InvariantError):
        cache.check_invariants()


def test_check_invariants_catches_a_child_locked_more_than_its_parent() -> None:
    _, cache = _two_branch_cache()
    _node(cache, (1, 2, 3)).lock_ref = 1  # parent [1,2] still 0
    with pytest.raises(InvariantError):
        cache.check_invariants()


def test_check_invariants_catches_size_counters_out_of_step() -> None:
    _, cache = _two_branch_cache()
    cache._evictable += 1
    with pytest.raises(InvariantError):
        cache.check_invariants()


def test_check_invariants_catches_a_child_under_the_wrong_key() -> None:
    _, cache = _two_branch_cache()
    node = _node(cache, (1, 2, 4))
    parent = node.parent
    del parent.children[node.child_key]
    wrong = np.array([3], dtype=np.int32).tobytes()  # the key of token 3, not 4
    node.child_key = wrong
    parent.children[wrong] = node
    with pytest.raises(InvariantError):
        cache.check_invariants()


# ---- page_size > 1: hash collisions never reuse the wrong KV ---------------------------------
def _constant_hash(page: bytes) -> int:
    return 12345


def _first_token_parity_hash(page: bytes) -> int:
    return int(np.frombuffer(page, dtype=np.int32)[0]) % 2


def _stamp(pool: TokenToKVPool, slots: list[int], tokens: list[int]) -> None:
    """Write each token's id into its slot's K and V, so a gather shows whose KV it is."""
    t = torch.tensor(tokens, dtype=torch.float32).reshape(-1, 1, 1)  # [n, 1, 1]
    pool.set_kv(0, torch.tensor(slots), t, t)


@pytest.mark.parametrize("hash_fn", [_constant_hash, _first_token_parity_hash])
def test_hash_collisions_never_return_another_pages_kv(monkeypatch: pytest.MonkeyPatch,
                                                       hash_fn: Any) -> None:
    pool, cache = make(page_size=2)
    monkeypatch.setattr(cache, "_hash_key", hash_fn)
    seqs = [[1, 2, 3, 4], [3, 4, 1, 2], [1, 4, 3, 2], [5, 6], [1, 2, 5, 6], [3, 4, 3, 4]]
    owned = {}
    for seq in seqs:
        slots, k = put(pool, cache, seq)
        _stamp(pool, slots, seq)
        owned[tuple(seq)] = (slots, k)
    check(pool, cache)
    k_buf, _ = pool.get_kv_buffer(0)
    for seq in seqs:
        m = cache.match_prefix(seq + [9, 9])
        assert m.length == len(seq)
        # the KV gathered through the matched slots is that of exactly these tokens
        assert k_buf[m.slots].reshape(-1).tolist() == [float(t) for t in seq]
    for q, want in [([1, 3], 0), ([3, 2], 0), ([1, 2, 3, 2], 2), ([5, 6, 1, 2], 2),
                    ([7, 8], 0), ([3, 4, 1, 2, 3, 4], 4)]:
        m = cache.match_prefix(q)
        assert m.length == want, q
        assert k_buf[m.slots].reshape(-1).tolist() == [float(t) for t in q[:want]]
    check(pool, cache)


@pytest.mark.parametrize("hash_fn", [_constant_hash, _first_token_parity_hash])
def test_hash_collision_sibling_still_found_after_the_other_is_evicted(
        monkeypatch: pytest.MonkeyPatch, hash_fn: Any) -> None:
    """Two root children whose first pages collide; evicting one must not hide the other."""
    pool, cache = make(page_size=2)
    monkeypatch.setattr(cache, "_hash_key", hash_fn)
    put(pool, cache, [1, 2])  # stored under the hash
    b, _ = put(pool, cache, [3, 4])  # collides with [1, 2]
    cache.match_prefix([3, 4])  # [1, 2] is the LRU leaf
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 2]).length == 0
    m = cache.match_prefix([3, 4])
    assert m.length == 2 and m.slots.tolist() == b  # still cached, so it must still match
    _, k = put(pool, cache, [3, 4])
    assert k == 2  # and re-inserting it must not store a second copy
    assert cache.total_size() == 2
    contents(cache)  # raises if a prefix is cached twice
    check(pool, cache)


def test_real_hash_page_cache_round_trip() -> None:
    """Without monkeypatching: many pages under one parent, all found again exactly."""
    pool, cache = make(num_slots=400, page_size=2)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 4, size=int(rng.integers(2, 9))).tolist() for _ in range(40)]
    for seq in seqs:
        slots, _ = put(pool, cache, seq)
    for seq in seqs:
        aligned = len(seq) // 2 * 2
        assert cache.match_prefix(seq).length == aligned
    check(pool, cache)


# ---- insert must not let two nodes hold one slot ---------------------------------------------
@pytest.mark.parametrize("case", ["tree_slot", "dup_in_call"])
def test_insert_rejects_slots_the_tree_already_holds(case: str) -> None:
    pool, cache = make()
    a, _ = put(pool, cache, [1, 2])
    s = pool.alloc(1).tolist()
    slots = [a[0], s[0]] if case == "tree_slot" else [s[0], s[0]]
    before = snapshot(pool, cache)
    with pytest.raises(InvalidSlotError):
        cache.insert([7, 8], slots)
    assert snapshot(pool, cache) == before
    check(pool, cache, held=s)


# ---- NaiveCache ------------------------------------------------------------------------------
def test_naive_cache_caches_nothing() -> None:
    pool = TokenToKVPool(16, 1, 1, 1)
    cache = NaiveCache(pool, page_size=2)
    slots = pool.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], slots) == 0
    # The aligned part (4 tokens) is freed at once; the tail stays the caller's.
    assert pool.available_size() == 15
    assert pool.is_free(slots[:4]).all() and not pool.is_free(slots[4:]).any()
    check(pool, cache, held=slots[4:])
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert m.length == 0 and m.slots.numel() == 0 and m.slots.dtype == torch.int64
    cache.lock(m.node)
    cache.lock(m.node)
    cache.unlock(m.node)
    cache.unlock(m.node)
    with pytest.raises(LockError):
        cache.unlock(m.node)
    assert cache.evict(100) == 0
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    s = cache.stats()
    assert (s.query_tokens, s.hit_tokens, s.hit_rate) == (5, 0, 0.0)
    cache.reset()
    assert cache.stats().query_tokens == 0
    check(pool, cache, held=slots[4:])


@pytest.mark.parametrize("case", ["len_mismatch", "free_slot"])
def test_naive_cache_bad_insert_raises_typed_and_frees_nothing(case: str) -> None:
    pool = TokenToKVPool(8, 1, 1, 1)
    cache = NaiveCache(pool)
    held = pool.alloc(3)
    h = held.tolist()
    toks, slots = {"len_mismatch": ([1, 2, 3, 4], h),
                   "free_slot": ([1, 2, 3], [h[0], h[1], 8])}[case]
    with pytest.raises(InvalidSlotError):
        cache.insert(toks, slots)
    assert pool.available_size() == 5
    check(pool, cache, held=held)


def test_pool_refuses_to_free_a_slot_the_cache_holds() -> None:
    pool, cache = make()
    a, _ = put(pool, cache, [1, 2, 3])
    before = snapshot(pool, cache)
    with pytest.raises(InvalidSlotError, match="held by the prefix cache"):
        pool.free([a[1]])
    assert snapshot(pool, cache) == before
    assert pool.num_cache_held() == cache.total_size() == 3
    cache.evict(3)
    assert pool.num_cache_held() == 0 and pool.available_size() == pool.num_slots
    check(pool, cache)
