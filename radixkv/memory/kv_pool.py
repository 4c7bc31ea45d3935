"""Level 3 of the memory hierarchy: per-token KV slots.

`TokenToKVPool` owns one K and one V buffer per layer, each with one row per token slot, and a
free-slot allocator. A request's KV may sit in any slots, in any order: the paged attention kernels
read K/V through slot indices, so shared prefixes are read in place.

Slot 0 is reserved: padded or dummy tokens write there, and it is never handed out. Usable slots are
1..num_slots. The allocator lives on the CPU (a numpy stack and a bitmap); slot tensors it returns
are CPU int64 tensors, which the engine moves to the device once per forward.

With `kv_cache_dtype="int8"` or `"fp8_e4m3"` the buffers hold quantized codes plus one float32
scale per (slot, KV head) (`radixkv.memory.kv_quant`): `set_kv` quantizes as it writes, and the
attention kernels read codes and scales (`get_kv_buffer`, `get_kv_scales`), dequantizing inside
the kernel.

Two implementations of the allocator share that state: a compiled one (csrc/slot_ops.cpp through
`radixkv.memory.native`: each alloc, free, check or adoption is one call over the batch) and the
numpy reference, used when the library cannot be built or `RADIXKV_TREE_KERNELS=0` (or
`RADIXKV_CPU_KERNELS=0`) is set when the pool is made. Both give the same slots, the same errors
and the same states; tests/test_tree_kernels.py checks that step by step.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from radixkv.errors import InvalidSlotError, InvariantError, OutOfSlotsError
from radixkv.memory import kv_quant, native
from radixkv.memory.kv_size import kv_bytes_per_token  # noqa: F401  (re-exported)

SlotsLike = torch.Tensor | np.ndarray | list[int]
_pack4 = struct.Struct("<4q").pack
_pack6 = struct.Struct("<6q").pack
_FREE, _USED, _RESERVED, _TREE = 0, 1, 2, 3  # _TREE: allocated and held by the prefix cache

# A faster quantize-and-store for set_kv: fn(src [n, H, D], slots [n], codes [rows, H, D],
# scales [rows, H]) -> True when it handled the call. `radixkv.attention` registers its fused
# CPU kernel here on import (memory cannot import attention, which sits above it).
QuantStore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], bool]
_quant_store_hook: QuantStore | None = None


def set_quant_store_hook(fn: QuantStore | None) -> None:
    """Install (or with None remove) the fast quantize-and-store used by quantized pools."""
    global _quant_store_hook
    _quant_store_hook = fn


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

    `dtype` is the model's (the dtype of the K/V given to `set_kv` and of the queries that read
    them); `kv_cache_dtype` picks the storage: "auto" (= dtype), "int8" or "fp8_e4m3", the
    latter two with float32 scales `[num_slots + 1, num_kv_heads]` per layer for K and for V
    (`kv_dtype` is the storage dtype, `quantized` says which). An unknown name raises
    `ConfigError` (see `kv_quant.parse_kv_cache_dtype`).

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
        kv_cache_dtype: str | torch.dtype = "auto",
    ) -> None:
        for name, value in (("num_slots", num_slots), ("num_layers", num_layers),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kv_dtype = kv_quant.parse_kv_cache_dtype(kv_cache_dtype, dtype)
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.quantized = kv_quant.is_quantized(kv_dtype)
        self.device = torch.device(device)
        shape = (num_slots + 1, num_kv_heads, head_dim)
        # Uninitialised: a slot is only read after its K/V were written, and untouched pages of a
        # large pool then cost no memory. Slot 0 (padding) is zeroed so a masked read is finite.
        self.k_buffers = [torch.empty(shape, dtype=kv_dtype, device=self.device)
                          for _ in range(num_layers)]
        self.v_buffers = [torch.empty(shape, dtype=kv_dtype, device=self.device)
                          for _ in range(num_layers)]
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[0].zero_()
        self.k_scales: list[torch.Tensor] = []
        self.v_scales: list[torch.Tensor] = []
        if self.quantized:
            sshape = (num_slots + 1, num_kv_heads)
            self.k_scales = [torch.empty(sshape, dtype=kv_quant.SCALE_DTYPE, device=self.device)
                             for _ in range(num_layers)]
            self.v_scales = [torch.empty(sshape, dtype=kv_quant.SCALE_DTYPE, device=self.device)
                             for _ in range(num_layers)]
            for buf in (*self.k_scales, *self.v_scales):
                buf[0].fill_(1.0)
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
        # The compiled allocator path (radixkv.memory.native), chosen once per pool; None runs
        # the numpy reference. It works on fixed buffers whose addresses are taken here once;
        # `_scratch` stages a batch of slots.
        self._lib = native.lib()
        if self._lib is not None:
            self._scratch = np.empty(num_slots, dtype=np.int64)
            self._scratch_p = self._scratch.ctypes.data
            # Each call's record starts with these fixed fields (see csrc/slot_ops.cpp).
            self._head = _pack4(self._state.ctypes.data, self._stack.ctypes.data, 0, num_slots)
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
        lib = self._lib
        if lib is not None:
            self._n_free = lib.rkv_alloc(self._head + _pack4(self._scratch_p, n, self._n_free,
                                                             _USED))
            return torch.from_numpy(self._scratch[:n].copy())
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
        lib = self._lib
        if lib is not None:
            n, ptr = self._stage(slots)
            if n == 0:
                return
            if ptr:
                group = self._group
                got = lib.rkv_free(self._head + _pack4(ptr, n, self._n_free, group is None))
                if got >= 0:
                    if group is None:
                        self._n_free = got
                    else:  # pushed when the group exits
                        group.append(self._scratch[:n].copy() if ptr == self._scratch_p
                                     else as_slot_array(slots).copy())
                    return
            self._raise_bad(as_slot_array(slots), distinct=True)
        arr = as_slot_array(slots)
        if arr.size == 0:
            return
        self._check_used(arr, distinct=True)
        self._release(arr)

    def _stage(self, slots: SlotsLike) -> tuple[int, int]:
        """(length, address of the slots as contiguous int64) for the compiled path.

        A contiguous CPU int64 tensor is read in place; anything else is copied into
        `_scratch`. The address is 0 when the slots cannot be valid (more than num_slots, or not
        integers), so the caller goes straight to the error path.
        """
        if (type(slots) is torch.Tensor and slots.dtype is torch.int64 and slots.is_cpu
                and slots.is_contiguous()):
            return slots.numel(), slots.data_ptr()
        try:
            arr = as_slot_array(slots)
        except InvalidSlotError:
            return 1, 0
        n = arr.size
        if n > self.num_slots:
            return n, 0
        self._scratch[:n] = arr
        return n, self._scratch_p

    def _check_used(self, arr: np.ndarray, distinct: bool = False) -> None:
        """Raise `InvalidSlotError` unless every slot in `arr` is allocated to a caller (not free,
        not reserved, not held by the prefix cache) and, with `distinct`, none is listed twice.

        Hot path (every insert and free): a handful of C-level numpy calls, no Python-level
        reductions. Out-of-range slots of both signs fail one unsigned comparison; repeats are
        found in O(n) by stamping each slot with its position and reading the stamps back.
        """
        n = arr.size
        lib = self._lib
        if lib is not None:
            if n == 0:
                return
            if n <= self.num_slots:
                self._scratch[:n] = arr
                p = self._scratch_p
                if not lib.rkv_take(self._head + _pack6(p, n, p, _USED, _USED, distinct)):
                    return
            self._raise_bad(arr, distinct)
        ok = np.maximum.reduce((arr - 1).view(np.uint64)) < self.num_slots
        ok = ok and np.count_nonzero(self._state[arr] != _USED) == 0
        if ok and distinct and n > 1:
            iota = self._iota[:n]
            self._stamp[arr] = iota  # a repeated slot keeps only its last position
            if np.count_nonzero(self._stamp[arr] != iota):
                self._raise_bad(arr, distinct)
        if not ok:
            self._raise_bad(arr, distinct)

    def _raise_bad(self, arr: np.ndarray, distinct: bool) -> None:
        """Error path only: raise `InvalidSlotError` naming the first bad slot of `arr`."""
        for slot in arr.tolist():
            if not 0 < slot <= self.num_slots:
                what = "slot 0 is reserved" if slot == 0 else f"slot {slot} is out of range"
                raise InvalidSlotError(f"{what} (usable slots are 1..{self.num_slots})")
            if self._state[slot] == _FREE:
                raise InvalidSlotError(f"KV slot {slot} is not allocated (double free?)")
            if self._state[slot] == _TREE:
                raise InvalidSlotError(f"KV slot {slot} is held by the prefix cache")
        if distinct:
            ordered = np.sort(arr)
            same = ordered[1:] == ordered[:-1]
            if same.any():
                raise InvalidSlotError(f"KV slot {int(ordered[1:][same][0])} is listed twice")
        raise AssertionError("unreachable: no bad slot found")

    def _adopt(self, arr: np.ndarray) -> None:
        """Mark slots (already checked with `_check_used(distinct=True)`) as the cache's own."""
        self._state[arr] = _TREE

    def _take(self, slots: SlotsLike, start: int, stop: int) -> np.ndarray:
        """Adopt `slots[start:stop]` for the prefix cache and return them as a new int64 array.

        One step for `RadixCache.insert`: raises `InvalidSlotError` (changing nothing) unless
        each of them is the caller's and none is listed twice, then marks them cache-held.
        """
        lib = self._lib
        k = stop - start
        if lib is not None and 0 < k <= self.num_slots:
            # A contiguous tensor's elements in memory order are its reshape(-1): read in place.
            if (type(slots) is torch.Tensor and slots.dtype is torch.int64 and slots.is_cpu
                    and slots.is_contiguous()):
                src = slots.data_ptr() + 8 * start
            else:
                self._scratch[:k] = as_slot_array(slots)[start:stop]
                src = self._scratch_p
            if not lib.rkv_take(self._head + _pack6(src, k, self._scratch_p, _USED, _TREE, 1)):
                return self._scratch[:k].copy()
            self._raise_bad(as_slot_array(slots)[start:stop], distinct=True)
        arr = as_slot_array(slots)[start:stop]
        self._check_used(arr, distinct=True)
        self._adopt(arr)
        return arr.copy()

    def num_cache_held(self) -> int:
        """Slots currently held by the prefix cache (O(num_slots); for invariant checks)."""
        return int(np.count_nonzero(self._state == _TREE))

    def _release(self, arr: np.ndarray) -> None:
        """Free slots known to be allocated and distinct (checked, or the cache's own)."""
        n = arr.size
        if self._lib is not None and n <= self.num_slots:
            self._scratch[:n] = arr
            self._release_staged(n)
            return
        self._state[arr] = _FREE
        if self._group is not None:
            self._group.append(arr.copy())  # pushed later: the caller may reuse its array
            return
        self._push(arr)

    def _release_parts(self, parts: list[np.ndarray], total: int) -> None:
        """`_release` of the concatenation of `parts` (`total` slots): one eviction's nodes."""
        if self._lib is not None and total <= self.num_slots:
            np.concatenate(parts, out=self._scratch[:total])  # staged without a temporary
            self._release_staged(total)
        else:
            self._release(np.concatenate(parts))

    def _release_staged(self, n: int) -> None:
        """The compiled `_release` of the first n slots of `_scratch`."""
        group = self._group
        got = self._lib.rkv_release(self._head + _pack4(self._scratch_p, n, self._n_free,
                                                        group is None))
        if got < 0:
            raise InvariantError(f"releasing {n} slots would overflow the free list: some of "
                                 "them are free already")
        self._n_free = got
        if group is not None:
            group.append(self._scratch[:n].copy())  # pushed when the group exits

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
        """K and V buffers of one layer, each `[num_slots + 1, num_kv_heads, head_dim]` in
        `kv_dtype` (quantized codes when `quantized`: read them with `get_kv_scales`)."""
        return self.k_buffers[layer], self.v_buffers[layer]

    def get_kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """K and V scales of one layer, each `[num_slots + 1, num_kv_heads]` float32, or
        (None, None) for an unquantized pool. Slot s, head h reads `code[s, h] * scale[s, h]`."""
        if not self.quantized:
            return None, None
        return self.k_scales[layer], self.v_scales[layer]

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of `len(slots)` tokens: k, v `[n, num_kv_heads, head_dim]` at `slots` `[n]`
        (quantized with a fresh scale per token and head when the pool is quantized)."""
        if not self.quantized:
            if k.dtype != self.kv_dtype:
                k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
            self.k_buffers[layer][slots] = k
            self.v_buffers[layer][slots] = v
            return
        for src, codes, scales in ((k, self.k_buffers[layer], self.k_scales[layer]),
                                   (v, self.v_buffers[layer], self.v_scales[layer])):
            hook = _quant_store_hook
            if hook is None or not hook(src, slots, codes, scales):
                q, s = kv_quant.quantize(src, self.kv_dtype)
                codes[slots] = q
                scales[slots] = s

    def get_kv(self, layer: int, slots: SlotsLike,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots`, each `[n, num_kv_heads, head_dim]` in `dtype` (default the
        model dtype), dequantized if need be: a copy of those rows only, for tests, tools and
        moving KV between tiers (attention reads the pool in place instead)."""
        idx = torch.as_tensor(as_slot_array(slots), device=self.device)
        dtype = dtype or self.dtype
        k, v = self.k_buffers[layer][idx], self.v_buffers[layer][idx]
        if not self.quantized:
            return k.to(dtype), v.to(dtype)
        return (kv_quant.dequantize(k, self.k_scales[layer][idx], dtype),
                kv_quant.dequantize(v, self.v_scales[layer][idx], dtype))

    def slot_buffers(self) -> list[torch.Tensor]:
        """Every buffer indexed by slot in dim 0 (all layers' K, then V, then their scales when
        quantized): what a slot's KV is, for copying it out to a KV tier and back in the stored
        form."""
        scales = [*self.k_scales, *self.v_scales] if self.quantized else []
        return [*self.k_buffers, *self.v_buffers, *scales]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V (and scales, when quantized) of slots `src` [n] into slots `dst` [n] in
        every layer (copy-on-write of a forked sequence's partially filled last page)."""
        if src.numel() == 0:
            return
        s, d = src.to(self.device), dst.to(self.device)
        for buf in self.slot_buffers():
            buf[d] = buf[s]

    def bytes_per_token(self) -> int:
        """Bytes of K plus V for one token across all layers (scales included)."""
        return kv_quant.pool_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim,
                                             self.kv_dtype)

    def total_bytes(self) -> int:
        """Bytes held by all K/V buffers, the reserved slot 0 included."""
        return self.bytes_per_token() * (self.num_slots + 1)

    def __repr__(self) -> str:
        return (f"TokenToKVPool(num_slots={self.num_slots}, free={self._n_free}, "
                f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, "
                f"kv_dtype={kv_quant.kv_cache_dtype_name(self.kv_dtype)}, device={self.device})")
