"""TokenToKVPool: buffers, allocator, typed errors that change nothing, free groups, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_no_leak
from hypothesis import given, settings
from hypothesis import strategies as st

from radixkv.errors import InvalidSlotError, OutOfSlotsError, RadixKVError
from radixkv.memory import TokenToKVPool


def make_pool(num_slots: int = 8, layers: int = 2, heads: int = 3, dim: int = 4,
              dtype: torch.dtype = torch.float32) -> TokenToKVPool:
    return TokenToKVPool(num_slots, layers, heads, dim, dtype=dtype, device="cpu")


def as_set(t: torch.Tensor) -> set[int]:
    return {int(x) for x in t.tolist()}


def pool_state(pool: TokenToKVPool) -> tuple[int, list[bool]]:
    """What an error must leave unchanged: free count and the free/used state of every slot."""
    return pool.available_size(), pool.is_free(np.arange(1, pool.num_slots + 1)).tolist()


# ---- buffers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_buffers_shape_dtype_and_per_layer(dtype: torch.dtype) -> None:
    pool = make_pool(num_slots=5, layers=3, heads=2, dim=7, dtype=dtype)
    for layer in range(3):
        k, v = pool.get_kv_buffer(layer)
        assert k.shape == v.shape == (6, 2, 7)  # [num_slots + 1, H, D]: slot 0 is reserved
        assert k.dtype == v.dtype == dtype
        assert k.device.type == v.device.type == "cpu"
        # The padding slot is finite (zero), so a masked read of it cannot produce NaN.
        assert float(k[0].abs().sum()) == 0.0 and float(v[0].abs().sum()) == 0.0
    # Every layer's K and V are separate storage: a write to one is seen nowhere else.
    bufs = [t for layer in range(3) for t in pool.get_kv_buffer(layer)]
    for i, t in enumerate(bufs):
        t.fill_(i)
    pool.get_kv_buffer(0)[0].fill_(-1)
    assert float(bufs[0].min()) == float(bufs[0].max()) == -1.0
    for i, t in enumerate(bufs[1:], start=1):
        assert float(t.min()) == float(t.max()) == float(i)


@pytest.mark.parametrize("bad", [0, -1])
@pytest.mark.parametrize("arg", range(4))
def test_constructor_rejects_non_positive_sizes(arg: int, bad: int) -> None:
    sizes = [4, 1, 1, 1]
    sizes[arg] = bad
    with pytest.raises(ValueError):
        TokenToKVPool(*sizes)


def test_set_kv_writes_only_the_given_slots() -> None:
    pool = make_pool(num_slots=6, layers=2, heads=2, dim=3)
    for layer in range(2):  # the buffers start uninitialised: mark every row first
        for t in pool.get_kv_buffer(layer):
            t.fill_(7.0)
    slots = pool.alloc(3)
    k = torch.arange(18, dtype=torch.float32).reshape(3, 2, 3)  # [n, H, D]
    v = -k
    pool.set_kv(1, slots, k, v)
    kb, vb = pool.get_kv_buffer(1)
    torch.testing.assert_close(kb[slots], k)
    torch.testing.assert_close(vb[slots], v)
    others = [s for s in range(7) if s not in as_set(slots)]
    assert bool((kb[others] == 7.0).all()) and bool((vb[others] == 7.0).all())
    k0, v0 = pool.get_kv_buffer(0)  # the other layer is untouched
    assert bool((k0 == 7.0).all()) and bool((v0 == 7.0).all())


def test_set_kv_converts_dtype_and_accepts_reserved_slot_zero() -> None:
    pool = make_pool(num_slots=4, layers=1, heads=1, dim=2, dtype=torch.float16)
    k = torch.tensor([[[0.5, 1.5]], [[2.5, 3.5]]], dtype=torch.float64)  # [2, 1, 2]
    pool.set_kv(0, torch.tensor([0, 3]), k, k * 2)  # slot 0 takes padding / dummy writes
    kb, vb = pool.get_kv_buffer(0)
    assert kb.dtype == torch.float16
    torch.testing.assert_close(kb[[0, 3]], k.half())
    torch.testing.assert_close(vb[[0, 3]], (k * 2).half())
    assert pool.available_size() == 4  # writing KV allocates nothing


@pytest.mark.parametrize(("dtype", "elem"), [(torch.float32, 4), (torch.float16, 2),
                                             (torch.bfloat16, 2)])
def test_bytes_per_token_and_total_bytes(dtype: torch.dtype, elem: int) -> None:
    pool = make_pool(num_slots=10, layers=3, heads=2, dim=8, dtype=dtype)
    assert pool.bytes_per_token() == 2 * 3 * 2 * 8 * elem  # K and V, every layer
    held = sum(t.numel() * t.element_size() for layer in range(3)
               for t in pool.get_kv_buffer(layer))
    assert pool.total_bytes() == held


# ---- allocator -------------------------------------------------------------------------------
def test_alloc_hands_out_every_usable_slot_once_and_never_slot_zero() -> None:
    pool = make_pool(num_slots=9)
    assert pool.available_size() == 9
    a, b = pool.alloc(4), pool.alloc(5)
    for t in (a, b):
        assert t.dtype == torch.int64 and t.device.type == "cpu" and t.dim() == 1
    assert len(as_set(a) | as_set(b)) == 9
    assert as_set(a) | as_set(b) == set(range(1, 10))
    assert pool.available_size() == 0
    assert_no_leak(pool, held=[a, b])


def test_alloc_zero_is_empty() -> None:
    pool = make_pool()
    out = pool.alloc(0)
    assert out.dtype == torch.int64 and out.numel() == 0
    assert pool.available_size() == 8


def test_alloc_too_many_raises_and_changes_nothing() -> None:
    pool = make_pool(num_slots=6)
    held = pool.alloc(4)
    before = pool_state(pool)
    with pytest.raises(OutOfSlotsError):
        pool.alloc(3)
    assert pool_state(pool) == before
    rest = pool.alloc(2)  # exactly the two free slots are still there
    assert as_set(rest) == set(range(1, 7)) - as_set(held)
    with pytest.raises(OutOfSlotsError):
        pool.alloc(1)
    assert pool.available_size() == 0
    assert issubclass(OutOfSlotsError, RadixKVError)


def test_free_returns_slots_for_reuse() -> None:
    pool = make_pool(num_slots=4)
    a = pool.alloc(4)
    pool.free(a[1:3])
    assert pool.available_size() == 2
    assert_no_leak(pool, held=[a[0], a[3]])
    again = pool.alloc(2)
    assert as_set(again) == as_set(a[1:3])
    assert_no_leak(pool, held=[a[0], a[3], again])


@pytest.mark.parametrize("kind", ["list", "numpy", "tensor", "tensor_int32"])
def test_free_accepts_lists_arrays_and_tensors(kind: str) -> None:
    pool = make_pool(num_slots=5)
    a = pool.alloc(3)
    conv = {"list": lambda t: t.tolist(), "numpy": lambda t: t.numpy().copy(),
            "tensor": lambda t: t.clone(), "tensor_int32": lambda t: t.to(torch.int32)}[kind]
    pool.free(conv(a))
    assert pool.available_size() == 5
    assert_no_leak(pool)


def test_free_empty_is_a_no_op() -> None:
    pool = make_pool(num_slots=3)
    pool.alloc(1)
    before = pool_state(pool)
    pool.free([])
    pool.free(torch.empty(0, dtype=torch.int64))
    assert pool_state(pool) == before


@pytest.mark.parametrize("case", ["slot0", "negative", "past_end", "already_free", "never_alloc",
                                  "twice_in_call", "valid_then_bad", "float"])
def test_bad_free_raises_and_frees_nothing(case: str) -> None:
    pool = make_pool(num_slots=6)
    held = pool.alloc(4)  # slots 5 and 6 are still free; held[3] gets freed below
    pool.free(held[3:])
    held = held[:3]
    h = held.tolist()
    bad = {
        "slot0": [h[0], 0],
        "negative": [h[0], -1],
        "past_end": [h[0], 7],
        "already_free": [h[0], h[1], 6],
        "never_alloc": [5],
        "twice_in_call": [h[0], h[1], h[0]],
        "valid_then_bad": [h[0], h[1], h[2], 99],
        "float": np.array([float(h[0])]),
    }[case]
    before = pool_state(pool)
    with pytest.raises(InvalidSlotError):
        pool.free(bad)
    assert pool_state(pool) == before  # nothing freed, not even the valid slots listed first
    assert_no_leak(pool, held=held)
    assert issubclass(InvalidSlotError, RadixKVError)
    pool.free(held)  # the caller's slots are still all freeable afterwards
    assert pool.available_size() == 6


@pytest.mark.parametrize("slot", [-1, -3, -9, -10])
def test_negative_slot_raises_even_when_the_pool_is_full(slot: int) -> None:
    """-k must not be read as slot num_slots + 1 - k (numpy wraps negative indices)."""
    pool = make_pool(num_slots=9)
    held = pool.alloc(9)  # every slot in use: a wrapped index would find a used slot
    before = pool_state(pool)
    with pytest.raises(InvalidSlotError):
        pool.free([slot])
    with pytest.raises(InvalidSlotError):
        pool.free(torch.tensor([int(held[0]), slot]))
    assert pool_state(pool) == before
    assert_no_leak(pool, held=held)
    assert pool.available_size() == 0


def test_double_free_after_free_raises() -> None:
    pool = make_pool(num_slots=3)
    a = pool.alloc(2)
    pool.free(a)
    with pytest.raises(InvalidSlotError):
        pool.free(a[:1])
    assert pool.available_size() == 3


# ---- free groups -----------------------------------------------------------------------------
def test_free_group_batches_frees_and_flushes_on_exit() -> None:
    pool = make_pool(num_slots=8)
    a, b, c = pool.alloc(3), pool.alloc(3), pool.alloc(2)
    with pool.free_group():
        pool.free(a)
        pool.free(b[:1])
        # inside the group nothing can hand out a slot that is still held
        inside = pool.alloc(pool.available_size())
        assert not as_set(inside) & (as_set(b[1:]) | as_set(c))
        pool.free(inside)
    assert pool.available_size() == 4
    assert_no_leak(pool, held=[b[1:], c])
    got = pool.alloc(4)
    assert as_set(got) == as_set(a) | as_set(b[:1])


def test_free_group_validates_each_free_at_once() -> None:
    pool = make_pool(num_slots=6)
    a = pool.alloc(4)
    with pool.free_group():
        pool.free(a[:2])
        with pytest.raises(InvalidSlotError):
            pool.free(a[1:3])  # a[1] was freed a moment ago in this same group
        with pytest.raises(InvalidSlotError):
            pool.free([0])
    assert pool.available_size() == 4  # a[:2] freed once; a[2] untouched by the failed call
    assert_no_leak(pool, held=a[2:])


def test_free_group_nested_and_exception_still_flushes() -> None:
    pool = make_pool(num_slots=6)
    a = pool.alloc(6)
    with pytest.raises(RuntimeError):
        with pool.free_group():
            pool.free(a[:2])
            with pool.free_group():
                pool.free(a[2:4])
            raise RuntimeError("boom")
    assert pool.available_size() == 4  # frees made before the exception are not lost
    assert_no_leak(pool, held=a[4:])
    assert as_set(pool.alloc(4)) == as_set(a[:4])


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_free_group_does_not_alias_the_callers_array(kind: str) -> None:
    """The caller may reuse a slot array it freed inside a group before the group exits."""
    pool = make_pool(num_slots=6)
    a = pool.alloc(3)
    keep = pool.alloc(3)
    buf = a.clone() if kind == "tensor" else a.numpy().copy()  # int64, as the engine holds them
    with pool.free_group():
        pool.free(buf)
        buf[:] = keep if kind == "tensor" else keep.numpy()  # the caller recycles its buffer
    assert_no_leak(pool, held=keep)
    assert as_set(pool.alloc(3)) == as_set(a)  # the freed slots, not what the buffer holds now


# ---- property: the allocator against a set model ---------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=40))
def test_alloc_free_sequence_matches_a_set_model(ops: list[tuple[bool, int]]) -> None:
    pool = make_pool(num_slots=10, layers=1, heads=1, dim=1)
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc:
            if n > 10 - len(held):
                with pytest.raises(OutOfSlotsError):
                    pool.alloc(n)
            else:
                got = pool.alloc(n).tolist()
                assert len(set(got)) == n and not set(got) & set(held)
                assert all(1 <= s <= 10 for s in got)
                held += got
        else:
            k = min(n, len(held))
            pool.free(held[:k])
            held = held[k:]
        assert pool.available_size() == 10 - len(held)
        assert_no_leak(pool, held=held)
