"""Stateful test: RadixCache + TokenToKVPool driven at random, checked against a reference model.

The model knows nothing of nodes. It is the set of cached page-prefixes per namespace (a prefix
is cached iff every page-aligned prefix of it is), each with the slots of its last page, plus the
slots the test itself holds and the locks it took. From that alone it predicts:
- match_prefix: the longest cached prefix and its exact slots (brute force over the set);
- insert: the return value and which of the passed slots the tree adopts;
- sizes: total = page * |set|, protected = page * |prefixes under some held lock|, and every
  node's lock count (the locks whose prefix runs through the node);
- ownership: free + cached + held == num_slots with no slot counted twice, after every step.

Eviction order is the implementation's choice among equals, so the model checks what it can say
exactly about each evict(k) call: only whole nodes go (nothing is split or merged by it), no locked
prefix goes, whatever goes stops being matched and its slots become free, the count returned is
the tokens that went, it stops early only when nothing evictable is left and overshoots by less
than one node, and the order is right: with model access times (last operation that covered a
prefix; for "lfu" the match count first), no node evicted is newer than any evictable leaf left.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_no_leak, path_of, tree_kernels
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from radixkv.errors import InvalidSlotError, LockError, OutOfSlotsError
from radixkv.memory import RadixCache, TokenToKVPool, TreeNode

NUM_SLOTS = 24
NAMESPACES: tuple[Hashable, ...] = (None, "a")
Key = tuple[Hashable, tuple[int, ...]]  # (namespace, page-aligned prefix)

ns_st = st.sampled_from(NAMESPACES)
pick_st = st.integers(0, 1 << 16)  # an index into one of the machine's lists, taken modulo
# A token sequence: a prefix of one the run already used (cut at any point) plus a fresh tail over
# a tiny alphabet, so that requests share prefixes, diverge inside nodes and extend leaves.
seq_st = st.tuples(pick_st, st.integers(0, 9), st.lists(st.integers(0, 3), max_size=5))




@dataclass
class Handle:
    """A node handle from match_prefix, with the prefix it ends at."""

    node: Any
    ns: Hashable
    prefix: tuple[int, ...]
    alive: bool = True  # False once that node was evicted (or the cache reset)


class RadixMachine(RuleBasedStateMachine):
    """One random run: page size and eviction policy are drawn first, then the operations."""

    hash_fn: Any = None  # a replacement for RadixCache._hash_key, to force hash collisions
    tree_kernels: str | None = None  # RADIXKV_TREE_KERNELS while building ("0": numpy reference)

    @initialize(page_size=st.sampled_from([1, 2]), policy=st.sampled_from(["lru", "lfu"]),
                warm=st.lists(st.tuples(ns_st, st.lists(st.integers(0, 3), min_size=1,
                                                        max_size=8)), max_size=5))
    def setup(self, page_size: int, policy: str, warm: list[tuple[Hashable, list[int]]]) -> None:
        """Build the pool and cache, then insert a few sequences (a tree to start from)."""
        if self.hash_fn is not None:
            page_size = 2  # hashing (and so collisions) only happens for pages of 2+ tokens
        self.page_size = page_size
        self.policy = policy
        with tree_kernels(self.tree_kernels):
            self.pool = TokenToKVPool(NUM_SLOTS, num_layers=1, num_kv_heads=1, head_dim=1)
            self.cache = RadixCache(self.pool, page_size=self.page_size,
                                    eviction_policy=self.policy)
        if self.hash_fn is not None:
            self.cache._hash_key = self.hash_fn  # type: ignore[method-assign]
        self.cached: dict[Key, tuple[int, ...]] = {}  # page-prefix -> its last page's slots
        self.t: dict[Key, int] = {}  # last operation that covered the prefix
        self.h: dict[Key, int] = {}  # match operations that covered it
        self.clock = 0
        self.held: list[int] = []  # slots the test owns
        self.locks: list[Handle] = []  # one entry per lock() call not yet undone
        self.handles: list[Handle] = []
        self.query = self.hit = self.evicted = 0
        self.seen: list[list[int]] = [[]]  # sequences used so far, for the next ones to share
        for ns, toks in warm:
            self.seen.append(toks)
            self.insert_fresh(ns, toks)

    def tokens(self, seq: tuple[int, int, list[int]]) -> list[int]:
        base, cut, tail = seq
        toks = self.seen[base % len(self.seen)][:cut] + tail
        self.seen.append(toks)
        return toks

    # ---- the model -----------------------------------------------------------------------------
    def aligned(self, toks: list[int]) -> int:
        return len(toks) // self.page_size * self.page_size

    def pages(self, ns: Hashable, toks: list[int], upto: int) -> list[Key]:
        p = self.page_size
        return [(ns, tuple(toks[:end])) for end in range(p, upto + 1, p)]

    def longest(self, ns: Hashable, toks: list[int]) -> int:
        length = 0
        for key in self.pages(ns, toks, self.aligned(toks)):
            if key not in self.cached:
                break
            length += self.page_size
        return length

    def model_slots(self, ns: Hashable, toks: list[int], length: int) -> list[int]:
        return [s for key in self.pages(ns, toks, length) for s in self.cached[key]]

    def touch(self, keys: list[Key], hit: bool) -> None:
        self.clock += 1
        for key in keys:
            self.t[key] = self.clock
            if hit:
                self.h[key] = self.h.get(key, 0) + 1

    def locked_keys(self) -> set[Key]:
        return {(lk.ns, lk.prefix[:end]) for lk in self.locks
                for end in range(self.page_size, len(lk.prefix) + 1, self.page_size)}

    def order_key(self, key: Key) -> Any:
        return self.t[key] if self.policy == "lru" else (self.h.get(key, 0), self.t[key])

    # ---- views of the tree ---------------------------------------------------------------------
    def tree_pages(self) -> dict[Key, tuple[int, ...]]:
        p = self.page_size
        out: dict[Key, tuple[int, ...]] = {}
        for node, _ in self.cache.walk():
            end = path_of(node)
            start = len(end) - len(node)
            vals = node.value.tolist()
            for i in range(0, len(node), p):
                key = (node.namespace, end[:start + i + p])
                assert key not in out, f"prefix {key} is cached by two nodes"
                out[key] = tuple(vals[i:i + p])
        return out

    def nodes(self) -> list[tuple[Hashable, tuple[int, ...], int, TreeNode]]:
        return [(n.namespace, path_of(n), len(n), n) for n, _ in self.cache.walk()]

    def snapshot(self) -> tuple[Any, ...]:
        s = self.cache.stats()
        return (self.tree_pages(), sorted((repr(ns), e, n, node.lock_ref)
                                          for ns, e, n, node in self.nodes()),
                self.pool.available_size(), self.cache.total_size(),
                self.cache.evictable_size(), self.cache.protected_size(),
                (s.query_tokens, s.hit_tokens, s.evicted_tokens, s.node_count),
                sorted(map(repr, self.cache.roots())))

    # ---- shared steps ----------------------------------------------------------------------------
    def do_match(self, ns: Hashable, toks: list[int]) -> Handle:
        want = self.longest(ns, toks)
        m = self.cache.match_prefix(toks, namespace=ns)
        assert m.length == want, f"match {toks} in {ns!r}: got {m.length}, longest is {want}"
        assert m.length % self.page_size == 0 and m.length <= len(toks)
        assert m.slots.dtype == torch.int64 and len(m.slots) == m.length
        assert m.slots.tolist() == self.model_slots(ns, toks, want)
        assert path_of(m.node) == tuple(toks[:want])  # the handle ends exactly at the match
        self.touch(self.pages(ns, toks, want), hit=True)
        self.query += len(toks)
        self.hit += want
        handle = Handle(m.node, ns, tuple(toks[:want]))
        self.handles.append(handle)
        return handle

    def do_insert(self, ns: Hashable, toks: list[int], slots: torch.Tensor) -> int:
        """Insert and check the return value; returns it. The caller settles its own slots."""
        n = self.aligned(toks)
        want = self.longest(ns, toks)
        k = self.cache.insert(toks, slots, namespace=ns)
        assert k == want, f"insert {toks} in {ns!r}: returned {k}, cached before was {want}"
        sl = slots.tolist()
        for key in self.pages(ns, toks, n)[k // self.page_size:]:
            end = len(key[1])
            self.cached[key] = tuple(sl[end - self.page_size:end])
        self.touch(self.pages(ns, toks, n), hit=False)
        return k

    def make_room(self, need: int) -> bool:
        """Evict if `need` slots are not free; False (after checking the error) if still short."""
        if need > self.pool.available_size():
            self.do_evict(need - self.pool.available_size())
        if need > self.pool.available_size():
            before = self.snapshot()
            with pytest.raises(OutOfSlotsError):
                self.pool.alloc(need)
            assert self.snapshot() == before
            return False
        return True

    def do_evict(self, k: int) -> None:
        before_pages = set(self.cached)
        before_nodes = self.nodes()
        free_before = self.pool.available_size()
        max_node = max((n for _, _, n, _ in before_nodes), default=0)
        freed = self.cache.evict(k)
        after_pages = self.tree_pages()
        assert set(after_pages) <= before_pages
        removed = before_pages - set(after_pages)
        assert freed == self.page_size * len(removed)
        assert self.pool.available_size() == free_before + freed
        gone = [s for key in removed for s in self.cached[key]]
        assert self.pool.is_free(np.asarray(gone, dtype=np.int64)).all()
        assert not self.locked_keys() & removed, "a locked prefix was evicted"
        if k <= 0:
            assert freed == 0
        else:
            if freed < k:
                assert self.cache.evictable_size() == 0, "evict stopped early"
            if freed:
                assert freed < k + max_node, "evict went on after freeing enough"
        # Whole nodes only: eviction neither splits nor merges what stays.
        after_nodes = self.nodes()
        ends_before = {(repr(ns), e, n) for ns, e, n, _ in before_nodes}
        assert {(repr(ns), e, n) for ns, e, n, _ in after_nodes} <= ends_before
        # Order: no evicted node is newer than an evictable leaf that stayed.
        after_ends = {(repr(ns), e) for ns, e, _, _ in after_nodes}
        p = self.page_size
        evicted_keys = [self.order_key((ns, e[:len(e) - n + p])) for ns, e, n, _ in before_nodes
                        if (repr(ns), e) not in after_ends]
        left_keys = [self.order_key((ns, e[:len(e) - n + p])) for ns, e, n, node in after_nodes
                     if node.lock_ref == 0 and not node.children]
        if evicted_keys and left_keys:
            assert max(evicted_keys) <= min(left_keys), (
                f"{self.policy}: evicted {max(evicted_keys)} while {min(left_keys)} stayed")
        for key in removed:
            del self.cached[key]
            self.t.pop(key, None)
            self.h.pop(key, None)
        for hd in self.handles:
            if hd.prefix and (hd.ns, hd.prefix) in removed:
                hd.alive = False
        self.evicted += freed

    # ---- rules ---------------------------------------------------------------------------------
    @rule(ns=ns_st, seq=seq_st, lock=st.booleans())
    def match(self, ns: Hashable, seq: tuple[int, int, list[int]], lock: bool) -> None:
        handle = self.do_match(ns, self.tokens(seq))
        if lock:
            self.cache.lock(handle.node)
            self.locks.append(handle)

    @rule(ns=ns_st, seq=seq_st)
    def insert_fresh_slots(self, ns: Hashable, seq: tuple[int, int, list[int]]) -> None:
        self.insert_fresh(ns, self.tokens(seq))

    def insert_fresh(self, ns: Hashable, toks: list[int]) -> None:
        """Insert with new slots for every position; the caller keeps what the tree does not."""
        if not self.make_room(len(toks)):
            return
        slots = self.pool.alloc(len(toks))
        k = self.do_insert(ns, toks, slots)
        n = self.aligned(toks)
        self.held += slots[:k].tolist() + slots[n:].tolist()

    @rule(ns=ns_st, seq=seq_st)
    def engine_request(self, ns: Hashable, seq: tuple[int, int, list[int]]) -> None:
        """A request's life: match, lock, evict if short, alloc the rest, insert, unlock."""
        toks = self.tokens(seq)
        handle = self.do_match(ns, toks)
        self.cache.lock(handle.node)
        self.locks.append(handle)
        m_len = len(handle.prefix)
        m_slots = self.model_slots(ns, toks, m_len)
        ok = self.make_room(len(toks) - m_len)
        if ok:
            new = self.pool.alloc(len(toks) - m_len)
            k = self.do_insert(ns, toks, torch.cat([torch.tensor(m_slots, dtype=torch.int64),
                                                    new]))
            assert k >= m_len  # the locked prefix was still there
            n = self.aligned(toks)
            self.held += new[:k - m_len].tolist() + new[n - m_len:].tolist()
        self.cache.unlock(handle.node)
        self.locks.remove(handle)

    @rule(ns=ns_st, seq=seq_st, kind=st.sampled_from(["zero", "negative", "free", "cached",
                                                        "twice"]), pick=pick_st)
    def bad_insert(self, ns: Hashable, seq: tuple[int, int, list[int]], kind: str,
                   pick: int) -> None:
        """An insert that would adopt a slot that is not the caller's raises and changes nothing."""
        toks = self.tokens(seq)
        n, cached_len = self.aligned(toks), self.longest(ns, toks)
        if cached_len == n:
            return  # nothing would be adopted, so nothing is checked
        free = np.flatnonzero(self.pool.is_free(np.arange(1, NUM_SLOTS + 1))) + 1
        cached = [s for page in self.cached.values() for s in page]
        if (kind == "free" and not free.size) or (kind == "cached" and not cached):
            return
        if kind == "twice" and (not self.held or n - cached_len < 2):
            return
        if kind == "free":
            bad = int(free[pick % free.size])
        elif kind == "cached":
            bad = cached[pick % len(cached)]
        elif kind == "twice":
            bad = self.held[pick % len(self.held)]
        else:
            bad = {"zero": 0, "negative": -1}[kind]
        slots = [bad] * len(toks)  # every adopted position gets the bad slot
        before = self.snapshot()
        with pytest.raises(InvalidSlotError):
            self.cache.insert(toks, slots, namespace=ns)
        assert self.snapshot() == before

    @rule(n=st.integers(0, 8))
    def alloc(self, n: int) -> None:
        if n > self.pool.available_size():
            before = self.snapshot()
            with pytest.raises(OutOfSlotsError):
                self.pool.alloc(n)
            assert self.snapshot() == before
            return
        got = self.pool.alloc(n).tolist()
        assert not set(got) & set(self.held)
        self.held += got

    @precondition(lambda self: self.held)
    @rule(pick=pick_st, count=st.integers(1, 6), group=st.booleans())
    def free(self, pick: int, count: int, group: bool) -> None:
        start = pick % len(self.held)
        chunk = self.held[start:start + count]
        if group:
            with self.pool.free_group():
                self.pool.free(chunk[:1])
                self.pool.free(chunk[1:])
        else:
            self.pool.free(chunk)
        del self.held[start:start + count]

    @rule(kind=st.sampled_from(["zero", "past_end", "negative", "free_slot", "twice",
                                "valid_then_free", "cached"]), pick=pick_st)
    def bad_free(self, kind: str, pick: int) -> None:
        free = np.flatnonzero(self.pool.is_free(np.arange(1, NUM_SLOTS + 1))) + 1
        cached = [s for page in self.cached.values() for s in page]
        h = self.held[pick % len(self.held)] if self.held else None
        if kind in ("free_slot", "valid_then_free") and not free.size:
            return
        if (kind == "twice" and h is None) or (kind == "cached" and not cached):
            return
        f = int(free[pick % free.size]) if free.size else 0
        c = cached[pick % len(cached)] if cached else 0
        bad = {"zero": [0], "past_end": [NUM_SLOTS + 1], "negative": [-1], "free_slot": [f],
               "twice": [h, h], "valid_then_free": self.held[:3] + [f],
               "cached": self.held[:2] + [c]}[kind]  # the tree's slot: not the caller's to free
        before = self.snapshot()
        with pytest.raises(InvalidSlotError):
            self.pool.free(bad)
        assert self.snapshot() == before

    @rule(k=st.integers(-1, 12))
    def evict(self, k: int) -> None:
        self.do_evict(k)

    @precondition(lambda self: self.locks)
    @rule(pick=pick_st)
    def unlock(self, pick: int) -> None:
        handle = self.locks.pop(pick % len(self.locks))
        self.cache.unlock(handle.node)

    @precondition(lambda self: self.handles)
    @rule(pick=pick_st)
    def relock(self, pick: int) -> None:
        """Lock a handle from an earlier match again; an evicted one must raise LockError."""
        handle = self.handles[pick % len(self.handles)]
        if handle.alive:
            self.cache.lock(handle.node)
            self.locks.append(handle)
            return
        before = self.snapshot()
        with pytest.raises(LockError):
            self.cache.lock(handle.node)
        assert self.snapshot() == before

    @precondition(lambda self: self.handles)
    @rule(pick=pick_st)
    def unlock_unlocked(self, pick: int) -> None:
        """unlock below zero (or of an evicted node) raises LockError and changes nothing."""
        handle = self.handles[pick % len(self.handles)]
        if not handle.prefix:
            return  # a root handle: lock and unlock are no-ops there
        under = sum(1 for lk in self.locks if lk.ns == handle.ns
                    and lk.prefix[:len(handle.prefix)] == handle.prefix)
        if handle.alive and under:
            return
        before = self.snapshot()
        with pytest.raises(LockError):
            self.cache.unlock(handle.node)
        assert self.snapshot() == before

    @rule()
    def reset(self) -> None:
        if self.locked_keys():  # a lock taken on a miss (a root) pins nothing
            before = self.snapshot()
            with pytest.raises(LockError):
                self.cache.reset()
            assert self.snapshot() == before
            return
        self.cache.reset()
        self.cached.clear()
        self.t.clear()
        self.h.clear()
        for hd in self.handles:
            if hd.prefix:
                hd.alive = False
        self.query = self.hit = self.evicted = 0
        assert self.pool.available_size() == NUM_SLOTS - len(self.held)

    # ---- checked after every step ----------------------------------------------------------------
    @invariant()
    def tree_matches_model(self) -> None:
        self.cache.check_invariants()
        assert_no_leak(self.pool, self.cache, self.held)
        assert self.tree_pages() == self.cached
        p = self.page_size
        assert self.cache.total_size() == p * len(self.cached)
        protected = p * len(self.locked_keys())
        assert self.cache.protected_size() == protected
        assert self.cache.evictable_size() == self.cache.total_size() - protected
        nodes = self.nodes()
        for ns, end, n, node in nodes:
            assert n > 0 and n % p == 0
            want = sum(1 for lk in self.locks if lk.ns == ns and lk.prefix[:len(end)] == end)
            assert node.lock_ref == want, f"lock count of {end} in {ns!r}"
        s = self.cache.stats()
        assert (s.query_tokens, s.hit_tokens, s.evicted_tokens) == (self.query, self.hit,
                                                                     self.evicted)
        assert s.node_count == len(nodes)


# A few seconds in CI. A failing run prints its steps unshrunk: shrinking these machines can take
# minutes. RADIXKV_FUZZ_SHRINK=1 shrinks to a minimal failing sequence; RADIXKV_FUZZ_EXAMPLES=2000
# makes a long bug hunt.
_EXAMPLES = int(os.environ.get("RADIXKV_FUZZ_EXAMPLES", "60"))
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("RADIXKV_FUZZ_SHRINK"):
    _PHASES.append(Phase.shrink)
SETTINGS = settings(max_examples=_EXAMPLES, stateful_step_count=30, deadline=None,
                    phases=_PHASES, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow])


def _constant_hash(page: bytes) -> int:
    return 7


class HashCollisionMachine(RadixMachine):
    """Every page hashes alike: only the token comparison keeps matches exact."""

    hash_fn = staticmethod(_constant_hash)


TestRadixCacheAgainstModel = RadixMachine.TestCase
TestRadixCacheAgainstModel.settings = SETTINGS
TestRadixCacheHashCollisions = HashCollisionMachine.TestCase
TestRadixCacheHashCollisions.settings = settings(SETTINGS, max_examples=max(_EXAMPLES // 2, 1))


class ReferencePathMachine(RadixMachine):
    """The same model check on the numpy reference allocator (the default run above uses the
    compiled one wherever it builds), so both paths meet every assertion."""

    tree_kernels = "0"


TestRadixCacheReferencePath = ReferencePathMachine.TestCase
TestRadixCacheReferencePath.settings = settings(SETTINGS, max_examples=max(_EXAMPLES // 2, 1))
