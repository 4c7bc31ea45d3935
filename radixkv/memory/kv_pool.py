"""Level 3 of the memory hierarchy: per-token KV slots.

`TokenToKVPool` owns one K and one V buffer per layer, each with one row per token slot, and a
free-slot allocator. A request's KV may sit in any slots, in any order: the paged attention kernels
read K/V through slot indices, so shared prefixes are read in place.

Slot 0 is reserved: padded or dummy tokens write there, and it is never handed out. Usable slots are
1..num_slots. The allocator lives on the CPU (a numpy stack and a bitmap); slot tensors it returns
are CPU int64 tensors, which the engine moves to the device once per forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from radixkv.errors import InvalidSlotError, OutOfSlotsError

SlotsLike = torch.Tensor | np.ndarray | list[int]
_FREE, _USED, _RESERVED, _TREE = 0, 1, 2, 3  # _TREE: allocated and held by the prefix cache


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes of K plus V for one token across all layers (what the pool allocates per slot)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * elem


def as_slot_array(slots: SlotsLike) -> np.ndarray:
    """View slot indices as a 1-D int64 numpy array (zero-copy for CPU int64 tensors)."""
    if type(slots) is np.ndarray and slots.dtype == np.int64 and slots.ndim == 1:
        return slots
    if isinstance(slots, torch.Tensor):
        slots = slots.detach()
        if slots.device.type != "cpu":
            slots = slots.cpu()
        arr = slots.numpy()
    else:
        arr = np.asarray(slots)
    if arr.dtype != np.int64:
        if arr.size and arr.dtype.kind not in "iu":
            raise InvalidSlotError(f"slot indices must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr.reshape(-1)


class TokenToKVPool:
    """Per-layer K/V buffers `[num_slots + 1, num_kv_heads, head_dim]` and a free-slot allocator.

    Invariant: every slot in 1..num_slots is either free (on the free stack, state _FREE)
    or owned by exactly one holder (a radix tree node or a running request). `alloc` and `free`
    check this at the boundary, so a double free raises instead of corrupting the free list.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, value in (("num_slots", num_slots), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots + 1, num_kv_heads, head_dim)
        # Uninitialised: a slot is only read after its K/V were written, and untouched pages of a
        # large pool then cost no memory. Slot 0 (padding) is zeroed so a masked read is finite.
        self.k_buffers = [torch.empty(shape, dtype=dtype, device=self.device)
                          for _ in range(num_layers)]
        self.v_buffers = [torch.empty(shape, dtype=dtype, device=self.device)
                          for _ in range(num_layers)]
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[0].zero_()
        # Free stack: the top `_n_free` entries of `_stack` are the free slots. Allocation pops
        # from the top, so recently freed (cache-warm) slots are reused first.
        self._stack = np.empty(num_slots, dtype=np.int64)
        # Per-slot state: _FREE, _USED (a caller's), _TREE (adopted by the prefix cache), or
        # _RESERVED (slot 0). One fancy-index read validates a whole batch of slots.
        self._state = np.full(num_slots + 1, _FREE, dtype=np.uint8)
        self._state[0] = _RESERVED
        self._stamp = np.zeros(num_slots + 1, dtype=np.int64)  # scratch for repeat detection
        self._iota = np.arange(num_slots + 1, dtype=np.int64)
        self._group: list[np.ndarray] | None = None
        self.clear()

    # ---- allocator -------------------------------------------------------------------------
    def clear(self) -> None:
        """Mark every slot free (the KV contents are left as they are)."""
        self._stack[:] = np.arange(self.num_slots, 0, -1, dtype=np.int64)  # pops 1, 2, 3, ...
        self._n_free = self.num_slots
        self._state[1:] = _FREE
        self._group = None

    def available_size(self) -> int:
        """Number of free slots."""
        return self._n_free

    def alloc(self, n: int) -> torch.Tensor:
        """Take `n` distinct free slots; returns a CPU int64 tensor of shape [n].

        Raises `OutOfSlotsError` (and changes nothing) when fewer than `n` slots are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of slots ({n})")
        if n > self._n_free:
            raise OutOfSlotsError(f"asked for {n} KV slots but only {self._n_free} of "
                                  f"{self.num_slots} are free")
        top = self._n_free
        out = self._stack[top - n:top][::-1].copy()
        self._n_free = top - n
        self._state[out] = _USED
        return torch.from_numpy(out)

    def free(self, slots: SlotsLike) -> None:
        """Return slots to the free list.

        Raises `InvalidSlotError` for slot 0, an out-of-range slot, a slot that is already free,
        or a slot listed twice; in every such case nothing is freed.
        """
        arr = as_slot_array(slots)
        if arr.size == 0:
            return
        self._check_used(arr, distinct=True)
        self._release(arr)

    def _check_used(self, arr: np.ndarray, distinct: bool = False) -> None:
        """Raise `InvalidSlotError` unless every slot in `arr` is allocated to a caller (not free,
        not reserved, not held by the prefix cache) and, with `distinct`, none is listed twice.

        Hot path (every insert and free): a handful of C-level numpy calls, no Python-level
        reductions. Out-of-range slots of both signs fail one unsigned comparison; repeats are
        found in O(n) by stamping each slot with its position and reading the stamps back.
        """
        n = arr.size
        ok = np.maximum.reduce((arr - 1).view(np.uint64)) < self.num_slots
        ok = ok and np.count_nonzero(self._state[arr] != _USED) == 0
        if ok and distinct and n > 1:
            iota = self._iota[:n]
            self._stamp[arr] = iota  # a repeated slot keeps only its last position
            if np.count_nonzero(self._stamp[arr] != iota):
                ordered = np.sort(arr)
                same = ordered[1:] == ordered[:-1]
                raise InvalidSlotError(f"KV slot {int(ordered[1:][same][0])} is listed twice")
        if not ok:
            for slot in arr.tolist():  # error path only: name the first bad slot
                if not 0 < slot <= self.num_slots:
                    what = "slot 0 is reserved" if slot == 0 else f"slot {slot} is out of range"
                    raise InvalidSlotError(f"{what} (usable slots are 1..{self.num_slots})")
                if self._state[slot] == _FREE:
                    raise InvalidSlotError(f"KV slot {slot} is not allocated (double free?)")
                if self._state[slot] == _TREE:
                    raise InvalidSlotError(f"KV slot {slot} is held by the prefix cache")
            raise AssertionError("unreachable")

    def _adopt(self, arr: np.ndarray) -> None:
        """Mark slots (already checked with `_check_used(distinct=True)`) as the cache's own."""
        self._state[arr] = _TREE

    def num_cache_held(self) -> int:
        """Slots currently held by the prefix cache (O(num_slots); for invariant checks)."""
        return int(np.count_nonzero(self._state == _TREE))

    def _release(self, arr: np.ndarray) -> None:
        """Free slots known to be allocated and distinct (checked, or the cache's own)."""
        self._state[arr] = _FREE
        if self._group is not None:
            self._group.append(arr.copy())  # pushed later: the caller may reuse its array
            return
        self._push(arr)

    def _push(self, arr: np.ndarray) -> None:
        top = self._n_free
        self._stack[top:top + arr.size] = arr
        self._n_free = top + arr.size

    @contextmanager
    def free_group(self) -> Iterator[None]:
        """Batch the frees made inside the block into one push onto the free list.

        Each `free` is still validated (and marked free) at once, so a double free inside the
        group raises at the offending call. Slots freed inside the group cannot be allocated
        until the block exits.
        """
        if self._group is not None:  # nested: the outer group flushes
            yield
            return
        self._group = []
        try:
            yield
        finally:
            group, self._group = self._group, None
            if group:
                self._push(group[0] if len(group) == 1 else np.concatenate(group))

    def is_free(self, slots: SlotsLike) -> np.ndarray:
        """Bool array: which of `slots` are currently free."""
        return self._state[as_slot_array(slots)] == _FREE

    # ---- KV storage --------------------------------------------------------------------------
    def get_kv_buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V buffers of one layer, each `[num_slots + 1, num_kv_heads, head_dim]`."""
        return self.k_buffers[layer], self.v_buffers[layer]

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of `len(slots)` tokens: k, v `[n, num_kv_heads, head_dim]` at `slots` `[n]`."""
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self.k_buffers[layer][slots] = k
        self.v_buffers[layer][slots] = v

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of slots `src` [n] into slots `dst` [n] in every layer (copy-on-write of a
        forked sequence's partially filled last page)."""
        if src.numel() == 0:
            return
        s, d = src.to(self.device), dst.to(self.device)
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[d] = buf[s]

    def bytes_per_token(self) -> int:
        """Bytes of K plus V for one token across all layers."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def total_bytes(self) -> int:
        """Bytes held by all K/V buffers, the reserved slot 0 included."""
        return self.bytes_per_token() * (self.num_slots + 1)

    def __repr__(self) -> str:
        return (f"TokenToKVPool(num_slots={self.num_slots}, free={self._n_free}, "
                f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})")
