"""What a replay records: per-tick series, refusals and events of one allocator, and both of them
side by side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radixkv.tools.simulate.trace import TraceRequest


@dataclass(frozen=True)
class Refusal:
    """An admission attempt that failed. `need` is what admission must find free."""

    tick: int
    request: str
    need: int
    free: int
    largest_hole: int
    reason: str
    layout: tuple[tuple[int, int, str | None], ...] = ()  # contiguous: (start, len, owner)

    @property
    def despite_free(self) -> bool:
        """Refused although at least `need` blocks were free in total."""
        return self.free >= self.need


@dataclass
class SimResult:
    """Per-tick series and events of one allocator replaying one trace.

    Series are numpy arrays indexed by tick: `used` (blocks holding KV of tokens already seen),
    `reserved` (blocks allocated: == used for paged), `free`, `largest_hole`, `running`,
    `waiting`. `owner` [ticks, num_blocks] gives the trace index owning each block after each
    tick (-1 free) and `in_use` marks reserved blocks that hold KV; both are None for large runs.
    """

    allocator: str
    num_blocks: int
    trace: list[TraceRequest]
    used: np.ndarray
    reserved: np.ndarray
    free: np.ndarray
    largest_hole: np.ndarray
    running: np.ndarray
    waiting: np.ndarray
    admitted: dict[str, int]
    finished: dict[str, int]
    refusals: list[Refusal]
    preemptions: int
    events: list[str]
    owner: np.ndarray | None
    in_use: np.ndarray | None

    @property
    def ticks(self) -> int:
        return len(self.used)

    @property
    def makespan(self) -> int:
        """Tick at which the last request had released its memory."""
        return max(self.finished.values())

    def utilisation(self) -> np.ndarray:
        """Share of blocks holding KV, per tick."""
        return self.used / self.num_blocks

    def internal_fragmentation(self) -> np.ndarray:
        """Share of all blocks reserved but not holding KV, per tick."""
        return (self.reserved - self.used) / self.num_blocks

    def external_fragmentation(self) -> np.ndarray:
        """Share of the free blocks that lie outside the largest hole, per tick (0 when none free).
        """
        free = np.maximum(self.free, 1)
        return np.where(self.free > 0, (self.free - self.largest_hole) / free, 0.0)

    def refused_despite_free(self) -> list[Refusal]:
        """Refusals at ticks when enough blocks were free in total."""
        return [r for r in self.refusals if r.despite_free]

    def mean_wait(self) -> float:
        """Mean ticks from arrival to (first) admission."""
        return float(np.mean([self.admitted[r.name] - r.arrival for r in self.trace]))

    def mean_latency(self) -> float:
        """Mean ticks from arrival to release."""
        return float(np.mean([self.finished[r.name] - r.arrival for r in self.trace]))


@dataclass(frozen=True)
class Comparison:
    """Both allocators on one trace."""

    contiguous: SimResult
    paged: SimResult
