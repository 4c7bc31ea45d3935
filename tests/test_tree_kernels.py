"""The compiled slot allocator (radixkv/memory/csrc/slot_ops.cpp) against its numpy reference.

Two pools and two trees, one pair on each path, are driven by the same random operations; every
result (allocated slots, return values, errors with their messages, per-slot states, sizes,
counters and the trees node by node) must be identical. The state machine of
test_radix_state_machine.py also runs on both paths.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_no_leak, path_of, tree_kernels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixkv.errors import InvalidSlotError, InvariantError, OutOfSlotsError
from radixkv.memory import RadixCache, TokenToKVPool, native

NUM_SLOTS = 40
compiled = pytest.mark.skipif(native.lib() is None,
                              reason="the compiled slot allocator is not built here")


def make(path: str, num_slots: int = NUM_SLOTS, page_size: int = 1
         ) -> tuple[TokenToKVPool, RadixCache]:
    with tree_kernels(path):
        pool = TokenToKVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1)
        return pool, RadixCache(pool, page_size=page_size)


def state(pool: TokenToKVPool, cache: RadixCache) -> tuple[Any, ...]:
    """Everything observable: free slots (in stack order), per-slot states, counters, nodes."""
    nodes = [(repr(n.namespace), path_of(n), n.value.tolist(), n.lock_ref, n.last_access,
              n.hit_count, d) for n, d in cache.walk()]
    return (pool.available_size(), pool._stack[:pool.available_size()].tolist(),
            pool._state.tolist(), cache.stats(), nodes)


def as_kind(slots: list[int], kind: str) -> Any:
    """The same slot ids in each input type the pool accepts."""
    if kind == "list":
        return list(slots)
    if kind == "np64":
        return np.array(slots, dtype=np.int64)
    if kind == "np32":
        return np.array(slots, dtype=np.int32)
    if kind == "t64":
        return torch.tensor(slots, dtype=torch.int64)
    if kind == "t32":
        return torch.tensor(slots, dtype=torch.int32)
    if kind == "strided":  # a non-contiguous view: every other element of a longer tensor
        return torch.tensor([x for s in slots for x in (s, -7)], dtype=torch.int64)[::2]
    assert kind == "2d" and len(slots) % 2 == 0
    return torch.tensor(slots, dtype=torch.int64).reshape(2, -1)


def outcome(fn: Any) -> Any:
    """A call's result, or its error type and message (what both paths must agree on)."""
    try:
        out = fn()
    except (InvalidSlotError, OutOfSlotsError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    if isinstance(out, torch.Tensor):
        return ("tensor", str(out.dtype), out.tolist())
    if hasattr(out, "slots"):  # a MatchResult: its node is compared through state()
        return ("match", out.slots.tolist(), out.length)
    return out


kinds = st.sampled_from(["list", "np64", "np32", "t64", "t32", "strided", "2d"])
ops = st.lists(st.tuples(st.sampled_from(["request", "alloc", "free", "bad_free", "bad_insert",
                                          "evict", "reset"]),
                         st.integers(0, 1 << 16), st.lists(st.integers(0, 3), max_size=7),
                         kinds), min_size=1, max_size=40)


@compiled
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, page_size=st.sampled_from([1, 2]))
def test_compiled_and_reference_paths_agree_step_by_step(ops: list[Any], page_size: int) -> None:
    sides = [make("1", page_size=page_size), make("0", page_size=page_size)]
    assert sides[0][0]._lib is not None and sides[1][0]._lib is None
    held: list[list[int]] = [[], []]
    for op, pick, toks, kind in ops:
        results = []
        for (pool, cache), mine in zip(sides, held, strict=True):
            results.append(_step(pool, cache, mine, op, pick, toks, kind))
        assert results[0] == results[1], (op, kind)
        assert held[0] == held[1]
        assert state(*sides[0]) == state(*sides[1])
        for (pool, cache), mine in zip(sides, held, strict=True):
            cache.check_invariants()
            assert_no_leak(pool, cache, mine)


def _step(pool: TokenToKVPool, cache: RadixCache, held: list[int], op: str, pick: int,
          toks: list[int], kind: str) -> Any:
    """One operation on one side; `held` is the test's own slots there (kept in step)."""
    if op == "request":  # a request's life, as the engine runs it
        m = cache.match_prefix(toks)
        cache.lock(m.node)
        need = len(toks) - m.length
        if need > pool.available_size():
            cache.evict(need - pool.available_size())
        if need > pool.available_size():
            cache.unlock(m.node)
            return ("short", m.length)
        new = pool.alloc(need).tolist()
        slots = m.slots.tolist() + new
        if kind == "2d" and len(slots) % 2:
            kind = "t64"
        k = cache.insert(toks, as_kind(slots, kind))
        n = len(toks) // cache.page_size * cache.page_size
        if k > m.length:
            pool.free(as_kind(slots[m.length:k], "t64"))
        held.extend(slots[n:])
        cache.unlock(m.node)
        return ("request", m.length, k, new)
    if op == "alloc":
        got = outcome(lambda: pool.alloc(pick % 9))
        if got[0] == "tensor":
            held.extend(got[2])
        return got
    if op == "free" and held:
        start = pick % len(held)
        chunk = held[start:start + 1 + pick % 5]
        if kind == "2d" and len(chunk) % 2:
            kind = "list"
        if pick % 3 == 0:
            with pool.free_group():
                got = outcome(lambda: pool.free(as_kind(chunk, kind)))
        else:
            got = outcome(lambda: pool.free(as_kind(chunk, kind)))
        del held[start:start + len(chunk)]
        return got
    if op == "bad_free":
        cached = cache.cached_slots().tolist()
        bad = [[0], [NUM_SLOTS + 1], [-1], held[:1] * 2, held[:2] + cached[:1],
               held[:1] + [s for s in range(1, NUM_SLOTS + 1) if pool.is_free([s])[0]][:1]]
        # only lists that are not entirely the caller's own, distinct slots
        bad = [b for b in bad if b and (len(set(b)) < len(b) or not set(b) <= set(held))]
        return outcome(lambda: pool.free(bad[pick % len(bad)]))
    if op == "bad_insert":
        m = cache.match_prefix(toks, record=False)
        # a repeated slot of the caller's (needs two positions), or the reserved slot 0
        bad = held[:1] * len(toks) if pick % 2 and held and len(toks) > 1 else [0] * len(toks)
        return m.length, outcome(lambda: cache.insert(toks, as_kind(bad, "list")))
    if op == "evict":
        return cache.evict(pick % 12)
    if op == "reset":
        cache.reset()
        return "reset"
    return None


@compiled
def test_the_environment_picks_the_path() -> None:
    assert make("0")[0]._lib is None
    assert make("1")[0]._lib is not None


@compiled
@pytest.mark.parametrize("kind", ["t64", "strided", "2d", "np32", "list"])
def test_insert_adopts_the_same_slots_from_every_input_type(kind: str) -> None:
    out = []
    for path in ("1", "0"):
        pool, cache = make(path)
        slots = pool.alloc(6).tolist()
        assert cache.insert([1, 2, 3, 4, 5, 6], as_kind(slots, kind)) == 0
        m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])
        assert m.slots.tolist() == slots
        assert pool.num_cache_held() == 6
        out.append(state(pool, cache))
    assert out[0] == out[1]


@compiled
def test_a_release_that_would_overflow_the_free_list_raises_and_changes_nothing() -> None:
    pool, cache = make("1", num_slots=4)
    before = state(pool, cache)
    with pytest.raises(InvariantError):
        pool._release(np.array([1, 2], dtype=np.int64))  # already free: no room on the stack
    assert state(pool, cache) == before


@compiled
def test_a_failed_check_restores_every_slot_it_marked() -> None:
    """Repeats are found by marking slots in the state array; an error must undo the marks."""
    pool, cache = make("1", num_slots=8)
    slots = pool.alloc(5).tolist()
    before = state(pool, cache)
    for bad in ([slots[0], slots[1], slots[0]], slots[:4] + [0], slots + [slots[2]]):
        with pytest.raises(InvalidSlotError):
            pool.free(bad)
        with pytest.raises(InvalidSlotError):
            cache.insert(list(range(len(bad))), bad)
        assert state(pool, cache) == before
    pool.free(slots)
    assert pool.available_size() == 8
