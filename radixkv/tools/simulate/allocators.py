"""The contiguous side's allocator: first-fit runs of adjacent blocks (the paged side is radixkv's
own `TokenToKVPool`, see `backends`)."""

from __future__ import annotations

import bisect

from radixkv.errors import ConfigError, InvalidSlotError


class ContiguousAllocator:
    """First-fit allocation of runs of adjacent blocks in an array of `num_blocks` blocks.

    Holes are kept sorted by start and merged with their neighbours on free, so `alloc` scans
    them left to right and takes the first one that is long enough.
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._starts: list[int] = [0]  # hole starts, sorted
        self._lens: list[int] = [num_blocks]  # hole lengths, parallel to _starts
        self._allocs: dict[int, int] = {}  # start -> length of each live allocation

    def alloc(self, n: int) -> int | None:
        """Start block of a new run of `n` blocks (first fit), or None if no hole is long enough."""
        if n < 1:
            raise ConfigError(f"cannot allocate {n} blocks")
        for i, length in enumerate(self._lens):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lens[i]
                else:
                    self._starts[i] += n
                    self._lens[i] -= n
                self._allocs[start] = n
                return start
        return None

    def free(self, start: int) -> None:
        """Release the run that begins at `start`; `InvalidSlotError` if none does."""
        n = self._allocs.pop(start, None)
        if n is None:
            raise InvalidSlotError(f"no allocation starts at block {start}")
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] == start:  # merge with the left
            i -= 1
            self._lens[i] += n
        else:
            self._starts.insert(i, start)
            self._lens.insert(i, n)
        if i + 1 < len(self._starts) and self._starts[i] + self._lens[i] == self._starts[i + 1]:
            self._lens[i] += self._lens.pop(i + 1)  # merge with the right
            del self._starts[i + 1]

    def free_blocks(self) -> int:
        return sum(self._lens)

    def largest_hole(self) -> int:
        return max(self._lens, default=0)

    def holes(self) -> list[tuple[int, int]]:
        """(start, length) of every hole, left to right."""
        return list(zip(self._starts, self._lens, strict=True))

    def allocations(self) -> dict[int, int]:
        """start -> length of every live allocation."""
        return dict(self._allocs)
