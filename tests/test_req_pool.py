"""ReqToTokenPool: the (request row, position) -> KV slot map and its row allocator."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixkv.errors import InvalidSlotError, OutOfSlotsError
from radixkv.memory import ReqToTokenPool


def test_table_shape_dtype_device() -> None:
    pool = ReqToTokenPool(3, 11)
    assert pool.req_to_token.shape == (3, 11)  # [max_requests, max_context_len]
    assert pool.req_to_token.dtype == torch.int32
    assert pool.req_to_token.device.type == "cpu"
    assert pool.available_size() == 3


@pytest.mark.parametrize(("r", "t"), [(0, 4), (4, 0), (-1, 4)])
def test_constructor_rejects_non_positive_sizes(r: int, t: int) -> None:
    with pytest.raises(ValueError):
        ReqToTokenPool(r, t)


def test_alloc_gives_distinct_rows_until_full() -> None:
    pool = ReqToTokenPool(4, 8)
    rows = [pool.alloc() for _ in range(4)]
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(isinstance(r, int) for r in rows)
    assert pool.available_size() == 0
    with pytest.raises(OutOfSlotsError):
        pool.alloc()
    assert pool.available_size() == 0
    pool.free(rows[2])
    assert pool.available_size() == 1
    assert pool.alloc() == rows[2]


@pytest.mark.parametrize("row", [-1, 4, 100])
def test_free_out_of_range_raises_and_changes_nothing(row: int) -> None:
    pool = ReqToTokenPool(4, 8)
    held = [pool.alloc(), pool.alloc()]
    with pytest.raises(InvalidSlotError):
        pool.free(row)
    assert pool.available_size() == 2
    for r in held:
        pool.free(r)
    assert pool.available_size() == 4


def test_double_free_raises_and_changes_nothing() -> None:
    pool = ReqToTokenPool(3, 8)
    a = pool.alloc()
    pool.free(a)
    with pytest.raises(InvalidSlotError):
        pool.free(a)
    assert pool.available_size() == 3
    with pytest.raises(InvalidSlotError):
        pool.free(2)  # never handed out
    assert pool.available_size() == 3
    # The free list was not corrupted: three allocs give three distinct rows, then it is full.
    assert sorted(pool.alloc() for _ in range(3)) == [0, 1, 2]
    with pytest.raises(OutOfSlotsError):
        pool.alloc()


def test_write_records_slots_at_positions() -> None:
    pool = ReqToTokenPool(2, 6)
    row = pool.alloc()
    pool.write(row, 0, torch.tensor([5, 6, 7], dtype=torch.int64))
    pool.write(row, 3, torch.tensor([9], dtype=torch.int64))
    assert pool.req_to_token[row, :4].tolist() == [5, 6, 7, 9]
    assert pool.req_to_token.dtype == torch.int32
    other = 1 - row
    assert pool.req_to_token[other].tolist() == [0] * 6


def test_write_past_context_len_raises_and_changes_nothing() -> None:
    pool = ReqToTokenPool(1, 4)
    row = pool.alloc()
    pool.write(row, 0, torch.tensor([1, 2], dtype=torch.int64))
    with pytest.raises(InvalidSlotError):
        pool.write(row, 2, torch.tensor([3, 4, 5], dtype=torch.int64))
    assert pool.req_to_token[row].tolist() == [1, 2, 0, 0]


def test_clear_frees_every_row() -> None:
    pool = ReqToTokenPool(3, 2)
    for _ in range(3):
        pool.alloc()
    pool.clear()
    assert pool.available_size() == 3
    assert sorted(pool.alloc() for _ in range(3)) == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 5), max_size=40))
def test_alloc_free_sequence_matches_a_set_model(ops: list[int]) -> None:
    """-1 allocs a row; k >= 0 frees row k (an error when k is not held; nothing changes then)."""
    pool = ReqToTokenPool(5, 3)
    held: set[int] = set()
    for op in ops:
        if op == -1:
            if len(held) == 5:
                with pytest.raises(OutOfSlotsError):
                    pool.alloc()
            else:
                row = pool.alloc()
                assert 0 <= row < 5 and row not in held
                held.add(row)
        elif op in held:
            pool.free(op)
            held.remove(op)
        else:
            with pytest.raises(InvalidSlotError):
                pool.free(op)
        assert pool.available_size() == 5 - len(held)
