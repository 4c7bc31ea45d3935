"""Level 2 of the memory hierarchy: (request row, position) -> KV slot."""

from __future__ import annotations

import torch

from radixkv.errors import InvalidSlotError, OutOfSlotsError


class ReqToTokenPool:
    """`req_to_token[row, pos]` is the KV slot holding token `pos` of the request in `row`.

    Rows are handed out by `alloc` and returned by `free`; a row's contents are only meaningful
    for the positions its request has filled.
    """

    def __init__(self, max_requests: int, max_context_len: int,
                 device: str | torch.device = "cpu") -> None:
        if max_requests < 1 or max_context_len < 1:
            raise ValueError("max_requests and max_context_len must be positive")
        self.max_requests = max_requests
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((max_requests, max_context_len), dtype=torch.int32,
                                        device=self.device)  # [R, T]
        self._free_rows = list(range(max_requests - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._is_free = [True] * max_requests

    def available_size(self) -> int:
        """Number of free rows."""
        return len(self._free_rows)

    def alloc(self) -> int:
        """Take a free row; raises `OutOfSlotsError` when every row is in use."""
        if not self._free_rows:
            raise OutOfSlotsError(f"all {self.max_requests} request rows are in use")
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        """Return a row; raises `InvalidSlotError` on an out-of-range row or a double free."""
        if not 0 <= row < self.max_requests:
            raise InvalidSlotError(f"request row {row} is out of range 0..{self.max_requests - 1}")
        if self._is_free[row]:
            raise InvalidSlotError(f"double free of request row {row}")
        self._is_free[row] = True
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record `slots` for positions `start .. start + len(slots)` of `row`."""
        end = start + slots.numel()
        if end > self.max_context_len:
            raise InvalidSlotError(f"positions up to {end} exceed max_context_len "
                                   f"{self.max_context_len}")
        self.req_to_token[row, start:end] = slots.to(self.req_to_token.device, torch.int32)

    def clear(self) -> None:
        """Free every row."""
        self._free_rows = list(range(self.max_requests - 1, -1, -1))
        self._is_free = [True] * self.max_requests
