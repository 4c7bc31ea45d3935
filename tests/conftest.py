"""Shared test helpers. Nothing here is autouse: import `assert_no_leak` or request the fixture."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from radixkv.memory import TokenToKVPool, TreeNode


def _slot_list(held: Iterable[Any] | torch.Tensor | np.ndarray | int) -> list[int]:
    """Flatten ints, lists, numpy arrays and tensors of slot ids into one list of ints."""
    if isinstance(held, int | np.integer):
        return [int(held)]
    if isinstance(held, torch.Tensor):
        return [int(s) for s in held.reshape(-1).tolist()]
    if isinstance(held, np.ndarray):
        return [int(s) for s in held.reshape(-1).tolist()]
    out: list[int] = []
    for item in held:
        out.extend(_slot_list(item))
    return out


def assert_no_leak(pool: TokenToKVPool, cache: Any = None, held: Any = ()) -> None:
    """Assert that every usable KV slot has exactly one owner.

    Each of slots 1..num_slots must be exactly one of: free in `pool`, held by `cache` (its
    `cached_slots()`; pass None for no cache), or listed in `held` (the slots the caller still
    owns: ints, lists, numpy arrays, tensors, or any nesting of them). So
    `available_size() + cached + held == num_slots`, and no slot is counted twice.

    Call it outside `pool.free_group()`: slots freed inside a group are only counted once it exits.
    """
    held_list = _slot_list(held)
    tree = [int(s) for s in cache.cached_slots().tolist()] if cache is not None else []
    owned = tree + held_list
    n = pool.num_slots
    if len(set(held_list)) != len(held_list):
        raise AssertionError("a slot is listed twice in `held`")
    if len(set(tree)) != len(tree):
        raise AssertionError("the cache holds a slot twice")
    both = set(tree) & set(held_list)
    if both:
        raise AssertionError(f"slots {sorted(both)[:8]} are held by both the cache and the caller")
    bad = [s for s in owned if not 1 <= s <= n]
    if bad:
        raise AssertionError(f"owned slots {bad[:8]} are outside 1..{n}")
    if owned:
        free_owned = np.asarray(owned)[pool.is_free(np.asarray(owned, dtype=np.int64))]
        if free_owned.size:
            raise AssertionError(f"owned slots {free_owned[:8].tolist()} are marked free")
    n_free = int(pool.is_free(np.arange(1, n + 1, dtype=np.int64)).sum())
    if n_free != pool.available_size():
        raise AssertionError(f"available_size() {pool.available_size()} != {n_free} free slots")
    if n_free + len(owned) != n:
        raise AssertionError(f"slot leak: {n_free} free + {len(tree)} cached + {len(held_list)} "
                             f"held = {n_free + len(owned)} != num_slots {n}")


@pytest.fixture
def no_leak() -> Any:
    """The `assert_no_leak(pool, cache=None, held=())` helper, as a fixture."""
    return assert_no_leak


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def path_of(node: TreeNode) -> tuple[int, ...]:
    """Tokens from the root down to the end of `node`."""
    out: list[int] = []
    while node.parent is not None:
        out[:0] = node.tokens.tolist()
        node = node.parent
    return tuple(out)


@contextmanager
def tree_kernels(value: str | None) -> Iterator[None]:
    """Build pools and caches inside with RADIXKV_TREE_KERNELS=value ("0": the numpy reference
    allocator, "1": the compiled one where it builds); None leaves the environment alone."""
    if value is None:
        yield
        return
    old = os.environ.get("RADIXKV_TREE_KERNELS")
    os.environ["RADIXKV_TREE_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["RADIXKV_TREE_KERNELS"]
        else:
            os.environ["RADIXKV_TREE_KERNELS"] = old
