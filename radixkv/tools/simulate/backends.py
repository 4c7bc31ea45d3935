"""The two allocators as the replay drives them: admit a request, grow running requests by one
token a tick, release, and report free blocks and who owns each block.

- `ContiguousBackend`: each request reserves prompt_len + max_new_tokens adjacent blocks (or a
  fixed reservation) first-fit, up front.
- `PagedBackend`: radixkv's real `TokenToKVPool` (one layer, one KV head, head_dim 1): the prompt's
  slots at admission, then one slot per generated token from anywhere; a request that cannot
  grow is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from radixkv.errors import ConfigError, InvariantError
from radixkv.memory import TokenToKVPool
from radixkv.tools.simulate.allocators import ContiguousAllocator
from radixkv.tools.simulate.trace import TraceRequest


@dataclass
class RunState:
    """A request while the replay holds it: its progress and what its allocator gave it."""

    req: TraceRequest
    index: int  # position in the trace (colours the block maps)
    admitted: int
    generated: int = 0
    start: int = -1  # contiguous: first block of the reservation
    reserved: int = 0  # contiguous: blocks reserved
    slots: list[Any] = field(default_factory=list)  # paged: CPU int64 slot tensors


class Backend:
    """What the replay asks of an allocator (`name` labels it, `unit` names its blocks)."""

    name = ""
    unit = "blocks"

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def check(self, req: TraceRequest) -> None:  # raise if `req` can never be admitted
        raise NotImplementedError

    def try_admit(self, run: RunState, running: list[RunState]) -> tuple[int, str | None]:
        """Admit `run` or return (need, reason for refusal)."""
        raise NotImplementedError

    def grow(self, running: list[RunState]) -> list[RunState]:
        """Give every running request one more token; returns the requests preempted."""
        return []

    def release(self, run: RunState) -> None:
        raise NotImplementedError

    def free_blocks(self) -> int:
        raise NotImplementedError

    def largest_hole(self) -> int:
        return self.free_blocks()

    def reserved(self, running: list[RunState]) -> int:
        return self.num_blocks - self.free_blocks()

    def fill_owner(self, running: list[RunState], owner: np.ndarray, in_use: np.ndarray) -> None:
        raise NotImplementedError

    def layout(self, running: list[RunState]) -> tuple[tuple[int, int, str | None], ...]:
        return ()

    def describe_admit(self, run: RunState) -> str:
        raise NotImplementedError

    def finish_check(self) -> None:
        pass


class ContiguousBackend(Backend):
    name = "contiguous"

    def __init__(self, num_blocks: int, reserve: int | None) -> None:
        super().__init__(num_blocks)
        self.reserve = reserve
        self.alloc = ContiguousAllocator(num_blocks)

    def _size(self, req: TraceRequest) -> int:
        return self.reserve if self.reserve is not None else req.max_len

    def check(self, req: TraceRequest) -> None:
        if self.reserve is not None and req.final_len > self.reserve:
            raise ConfigError(f"request {req.name!r} grows to {req.final_len} tokens, more than "
                              f"the fixed reservation of {self.reserve}")
        if self._size(req) > self.num_blocks:
            raise ConfigError(f"request {req.name!r} reserves {self._size(req)} blocks but "
                              f"there are only {self.num_blocks}: it could never run")

    def try_admit(self, run: RunState, running: list[RunState]) -> tuple[int, str | None]:
        need = self._size(run.req)
        start = self.alloc.alloc(need)
        if start is None:
            if self.alloc.free_blocks() < need:
                return need, "not enough free blocks"
            return need, "no hole long enough (external fragmentation)"
        run.start, run.reserved = start, need
        return need, None

    def release(self, run: RunState) -> None:
        self.alloc.free(run.start)

    def free_blocks(self) -> int:
        return self.alloc.free_blocks()

    def largest_hole(self) -> int:
        return self.alloc.largest_hole()

    def reserved(self, running: list[RunState]) -> int:
        return sum(r.reserved for r in running)

    def fill_owner(self, running: list[RunState], owner: np.ndarray, in_use: np.ndarray) -> None:
        for r in running:
            owner[r.start:r.start + r.reserved] = r.index
            in_use[r.start:r.start + r.req.prompt_len + r.generated] = True

    def layout(self, running: list[RunState]) -> tuple[tuple[int, int, str | None], ...]:
        by_start = {r.start: r.req.name for r in running}
        parts = [(s, n, by_start.get(s)) for s, n in self.alloc.allocations().items()]
        parts += [(s, n, None) for s, n in self.alloc.holes()]
        return tuple(sorted(parts))

    def describe_admit(self, run: RunState) -> str:
        r = run.req
        how = (f"{r.prompt_len} prompt + up to {r.max_new_tokens} new" if self.reserve is None
               else f"fixed reservation {self.reserve}")
        return (f"reserved {run.reserved} blocks [{run.start},{run.start + run.reserved}) "
                f"({how})")


class PagedBackend(Backend):
    """radixkv's `TokenToKVPool` as the allocator; block b is pool slot b + 1 (slot 0 is the
    pool's reserved padding slot)."""

    name = "paged"
    unit = "slots"

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        # One layer, one KV head, head_dim 1: the allocator is real, the buffers are ~nothing.
        self.pool = TokenToKVPool(num_slots=num_blocks, num_layers=1, num_kv_heads=1, head_dim=1)

    def check(self, req: TraceRequest) -> None:
        if req.final_len > self.num_blocks:
            raise ConfigError(f"request {req.name!r} grows to {req.final_len} tokens but there "
                              f"are only {self.num_blocks} slots: it could never finish")

    def try_admit(self, run: RunState, running: list[RunState]) -> tuple[int, str | None]:
        # The prompt plus its first token, and one slot for every running request's next token,
        # so admitting never forces a preemption in the same tick.
        need = run.req.prompt_len + 1 + len(running)
        if self.pool.available_size() < need:
            return need, (f"not enough free slots ({run.req.prompt_len} prompt + 1 new token + "
                          f"{len(running)} for the running requests' next tokens)")
        run.slots = [self.pool.alloc(run.req.prompt_len)]
        return need, None

    def grow(self, running: list[RunState]) -> list[RunState]:
        victims: list[RunState] = []
        active = list(running)
        while self.pool.available_size() < len(active):
            # The most recently admitted goes first (the last one listed among equals).
            victim = max(reversed(active), key=lambda r: r.admitted)
            active.remove(victim)
            self.release(victim)
            victims.append(victim)
        for r in active:
            r.slots.append(self.pool.alloc(1))
        return victims

    def release(self, run: RunState) -> None:
        if run.slots:
            self.pool.free(torch.cat(run.slots))
        run.slots = []

    def free_blocks(self) -> int:
        return self.pool.available_size()

    def fill_owner(self, running: list[RunState], owner: np.ndarray, in_use: np.ndarray) -> None:
        for r in running:
            if r.slots:
                idx = torch.cat(r.slots).numpy() - 1
                owner[idx] = r.index
                in_use[idx] = True

    def describe_admit(self, run: RunState) -> str:
        slots = run.slots[0].numpy()
        shown = ", ".join(map(str, slots[:6].tolist())) + (", ..." if len(slots) > 6 else "")
        return f"took {len(slots)} slots for its prompt ({shown}); one more per token"

    def finish_check(self) -> None:
        if self.pool.available_size() != self.num_blocks:
            raise InvariantError(f"{self.num_blocks - self.pool.available_size()} slots still "
                                 "allocated after every request finished")
