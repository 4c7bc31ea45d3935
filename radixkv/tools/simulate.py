"""Fragmentation simulator: contiguous max-length reservation vs radixkv's per-token slots.

One request trace (arrival tick, prompt length, tokens actually generated, and the
`max_new_tokens` the client asked for) is replayed on two allocators over the same number of
blocks (1 block = one token's KV):

- contiguous: each request reserves `prompt_len + max_new_tokens` adjacent blocks up front
  (it cannot know it will stop early), placed first-fit in a block array. Reserved-but-unused
  blocks are internal fragmentation; free blocks split into holes too small for the next request
  are external fragmentation.
- paged: radixkv's real `TokenToKVPool` allocator (one layer, one KV head, head_dim 1, so the
  buffers are tiny): the prompt's slots at admission, then one slot per generated token, from
  anywhere in the pool. A request that cannot grow is preempted (its slots freed, recomputed
  later), as a paged server does.

Time advances in ticks. Each tick: finished requests release memory; arrivals join a FCFS queue;
the queue head is admitted while it fits (a refusal blocks the queue that tick); then every running
request produces one token. A request admitted at tick t with output_len n finishes after tick
t + n - 1 and holds prompt_len + n blocks at the end.

`seed_trace()` is the teaching scenario on 100 blocks (see its docstring); `random_trace` makes a
seeded Poisson trace; `compare` runs both allocators, `format_report` and `plot_comparison` show
the result.
"""

from __future__ import annotations

import bisect
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radixkv.errors import ConfigError, InvalidSlotError, InvariantError

SEED_BLOCKS = 100
_HISTORY_CELLS = 4_000_000  # keep per-tick block maps only while ticks x blocks stays below this


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. Lengths are in tokens (= blocks)."""

    name: str
    arrival: int  # tick at which it arrives
    prompt_len: int
    output_len: int  # tokens it really generates before stopping
    max_new_tokens: int  # the cap it asked for; a contiguous cache must reserve up to it

    @property
    def final_len(self) -> int:
        """Blocks the request holds when it finishes (prompt + generated tokens)."""
        return self.prompt_len + self.output_len

    @property
    def max_len(self) -> int:
        """Blocks a contiguous cache reserves for it: prompt + max_new_tokens."""
        return self.prompt_len + self.max_new_tokens


def validate_trace(trace: list[TraceRequest]) -> list[TraceRequest]:
    """Check a trace; raises `ConfigError` naming the first bad request."""
    if not trace:
        raise ConfigError("the trace is empty")
    names: set[str] = set()
    for r in trace:
        if not isinstance(r, TraceRequest):
            raise ConfigError(f"trace entries must be TraceRequest, got {type(r).__name__}")
        for what, v, lo in (("arrival", r.arrival, 0), ("prompt_len", r.prompt_len, 1),
                            ("output_len", r.output_len, 1),
                            ("max_new_tokens", r.max_new_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"request {r.name!r}: {what} must be an integer >= {lo}, "
                                  f"got {v!r}")
        if r.output_len > r.max_new_tokens:
            raise ConfigError(f"request {r.name!r}: output_len {r.output_len} exceeds "
                              f"max_new_tokens {r.max_new_tokens}")
        if r.name in names:
            raise ConfigError(f"request name {r.name!r} appears twice")
        names.add(r.name)
    return list(trace)


def seed_trace() -> list[TraceRequest]:
    """The 100-block teaching scenario: A takes 40, B takes 40, C needs 30.

    Tick 0: A (38 prompt tokens, stops after 2) and B (35 + 5) reserve 40 blocks each: A gets
    [0,40), B [40,80); 20 blocks stay free at [80,100). Tick 1: C arrives with 29 prompt tokens
    and asks for up to 21 new tokens; it will stop after 1, so it needs 30 blocks, but a
    contiguous cache must reserve 29 + 21 = 50. Both allocators refuse it (too little free).
    Tick 2: A finishes. Contiguous: 60 blocks free, but as two holes, [0,40) and [80,100); no
    50-block hole, so C is refused with enough memory free (external fragmentation, made worse
    by the 20 reserved blocks C would never use). Paged: C takes its 30 slots from anywhere and
    runs. Contiguous admits C only at tick 5, when B finishes.

    Why C's reservation is 50 and not 30: once A's 40 blocks are free they form one hole, so a
    30-block reservation would fit; with one 40-block request left in 100 blocks the 60 free
    blocks lie in at most two holes, one of them at least 30 long. "60 free yet no room" needs a
    request larger than any hole, here C's max-length reservation.
    """
    return [TraceRequest("A", 0, 38, 2, 2), TraceRequest("B", 0, 35, 5, 5),
            TraceRequest("C", 1, 29, 1, 21)]


def random_trace(num_requests: int = 200, seed: int = 0, arrival_rate: float = 0.1,
                 prompt_len: tuple[int, int] = (8, 128), output_len: tuple[int, int] = (4, 128),
                 max_new_tokens: int = 128) -> list[TraceRequest]:
    """A seeded trace: Poisson arrivals (`arrival_rate` requests per tick), uniform prompt
    lengths, and outputs that stop early (uniform in `output_len`, capped by `max_new_tokens`)."""
    if num_requests < 1 or arrival_rate <= 0:
        raise ConfigError("num_requests must be >= 1 and arrival_rate > 0")
    if not (1 <= prompt_len[0] <= prompt_len[1] and 1 <= output_len[0] <= output_len[1]):
        raise ConfigError(f"bad length ranges: prompt {prompt_len}, output {output_len}")
    if max_new_tokens < output_len[0]:
        raise ConfigError(f"max_new_tokens {max_new_tokens} < shortest output {output_len[0]}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / arrival_rate, size=num_requests)
    arrivals = np.floor(np.cumsum(gaps) - gaps[0]).astype(int)
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    outs = np.minimum(rng.integers(output_len[0], output_len[1] + 1, size=num_requests),
                      max_new_tokens)
    return [TraceRequest(f"r{i}", int(a), int(p), int(o), int(max_new_tokens))
            for i, (a, p, o) in enumerate(zip(arrivals, prompts, outs, strict=True))]


def load_trace(path: str | Path) -> list[TraceRequest]:
    """A trace from JSON: a list of {name?, arrival, prompt_len, output_len, max_new_tokens?}.

    `max_new_tokens` defaults to `output_len` (the client asked for exactly what it got).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read trace {path}: {exc}") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a trace is a JSON list of requests")
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: entry {i} is not an object")
        try:
            out.append(TraceRequest(str(d.get("name", f"r{i}")), d["arrival"], d["prompt_len"],
                                    d["output_len"], d.get("max_new_tokens", d["output_len"])))
        except KeyError as exc:
            raise ConfigError(f"{path}: entry {i} lacks {exc}") from exc
    return validate_trace(out)


# ---- the contiguous allocator ------------------------------------------------------------------
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


# ---- simulation --------------------------------------------------------------------------------
@dataclass
class _Running:
    req: TraceRequest
    index: int  # position in the trace (colours the block maps)
    admitted: int
    generated: int = 0
    start: int = -1  # contiguous: first block of the reservation
    reserved: int = 0  # contiguous: blocks reserved
    slots: list[Any] = field(default_factory=list)  # paged: CPU int64 slot tensors


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


class _Backend:
    name = ""
    unit = "blocks"

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def check(self, req: TraceRequest) -> None:  # raise if `req` can never be admitted
        raise NotImplementedError

    def try_admit(self, run: _Running, running: list[_Running]) -> tuple[int, str | None]:
        """Admit `run` or return (need, reason for refusal)."""
        raise NotImplementedError

    def grow(self, running: list[_Running]) -> list[_Running]:
        """Give every running request one more token; returns the requests preempted."""
        return []

    def release(self, run: _Running) -> None:
        raise NotImplementedError

    def free_blocks(self) -> int:
        raise NotImplementedError

    def largest_hole(self) -> int:
        return self.free_blocks()

    def reserved(self, running: list[_Running]) -> int:
        return self.num_blocks - self.free_blocks()

    def fill_owner(self, running: list[_Running], owner: np.ndarray, in_use: np.ndarray) -> None:
        raise NotImplementedError

    def layout(self, running: list[_Running]) -> tuple[tuple[int, int, str | None], ...]:
        return ()

    def describe_admit(self, run: _Running) -> str:
        raise NotImplementedError

    def finish_check(self) -> None:
        pass


class _Contiguous(_Backend):
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

    def try_admit(self, run: _Running, running: list[_Running]) -> tuple[int, str | None]:
        need = self._size(run.req)
        start = self.alloc.alloc(need)
        if start is None:
            if self.alloc.free_blocks() < need:
                return need, "not enough free blocks"
            return need, "no hole long enough (external fragmentation)"
        run.start, run.reserved = start, need
        return need, None

    def release(self, run: _Running) -> None:
        self.alloc.free(run.start)

    def free_blocks(self) -> int:
        return self.alloc.free_blocks()

    def largest_hole(self) -> int:
        return self.alloc.largest_hole()

    def reserved(self, running: list[_Running]) -> int:
        return sum(r.reserved for r in running)

    def fill_owner(self, running: list[_Running], owner: np.ndarray, in_use: np.ndarray) -> None:
        for r in running:
            owner[r.start:r.start + r.reserved] = r.index
            in_use[r.start:r.start + r.req.prompt_len + r.generated] = True

    def layout(self, running: list[_Running]) -> tuple[tuple[int, int, str | None], ...]:
        by_start = {r.start: r.req.name for r in running}
        parts = [(s, n, by_start.get(s)) for s, n in self.alloc.allocations().items()]
        parts += [(s, n, None) for s, n in self.alloc.holes()]
        return tuple(sorted(parts))

    def describe_admit(self, run: _Running) -> str:
        r = run.req
        how = (f"{r.prompt_len} prompt + up to {r.max_new_tokens} new" if self.reserve is None
               else f"fixed reservation {self.reserve}")
        return (f"reserved {run.reserved} blocks [{run.start},{run.start + run.reserved}) "
                f"({how})")


class _Paged(_Backend):
    """radixkv's `TokenToKVPool` as the allocator; block b is pool slot b + 1 (slot 0 is the
    pool's reserved padding slot)."""

    name = "paged"
    unit = "slots"

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        import torch

        from radixkv.memory import TokenToKVPool

        self._torch = torch
        # One layer, one KV head, head_dim 1: the allocator is real, the buffers are ~nothing.
        self.pool = TokenToKVPool(num_slots=num_blocks, num_layers=1, num_kv_heads=1, head_dim=1)

    def check(self, req: TraceRequest) -> None:
        if req.final_len > self.num_blocks:
            raise ConfigError(f"request {req.name!r} grows to {req.final_len} tokens but there "
                              f"are only {self.num_blocks} slots: it could never finish")

    def try_admit(self, run: _Running, running: list[_Running]) -> tuple[int, str | None]:
        # The prompt plus its first token, and one slot for every running request's next token,
        # so admitting never forces a preemption in the same tick.
        need = run.req.prompt_len + 1 + len(running)
        if self.pool.available_size() < need:
            return need, (f"not enough free slots ({run.req.prompt_len} prompt + 1 new token + "
                          f"{len(running)} for the running requests' next tokens)")
        run.slots = [self.pool.alloc(run.req.prompt_len)]
        return need, None

    def grow(self, running: list[_Running]) -> list[_Running]:
        victims: list[_Running] = []
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

    def release(self, run: _Running) -> None:
        if run.slots:
            self.pool.free(self._torch.cat(run.slots))
        run.slots = []

    def free_blocks(self) -> int:
        return self.pool.available_size()

    def fill_owner(self, running: list[_Running], owner: np.ndarray, in_use: np.ndarray) -> None:
        for r in running:
            if r.slots:
                idx = self._torch.cat(r.slots).numpy() - 1
                owner[idx] = r.index
                in_use[idx] = True

    def describe_admit(self, run: _Running) -> str:
        slots = run.slots[0].numpy()
        shown = ", ".join(map(str, slots[:6].tolist())) + (", ..." if len(slots) > 6 else "")
        return f"took {len(slots)} slots for its prompt ({shown}); one more per token"

    def finish_check(self) -> None:
        if self.pool.available_size() != self.num_blocks:
            raise InvariantError(f"{self.num_blocks - self.pool.available_size()} slots still "
                                 "allocated after every request finished")


def _simulate(trace: list[TraceRequest], backend: _Backend, max_ticks: int | None) -> SimResult:
    trace = validate_trace(trace)
    for r in trace:
        backend.check(r)
    if max_ticks is None:  # a generous bound: everything run back to back, plus the arrivals
        max_ticks = max(r.arrival for r in trace) + 2 * sum(r.final_len for r in trace) + 10
    n = backend.num_blocks
    pending = deque(sorted(range(len(trace)), key=lambda i: (trace[i].arrival, i)))
    waiting: deque[_Running | int] = deque()
    running: list[_Running] = []
    admitted: dict[str, int] = {}
    finished: dict[str, int] = {}
    refusals: list[Refusal] = []
    events: list[str] = []
    last_logged: dict[str, tuple[int, int, str]] = {}
    series: list[tuple[int, int, int, int, int, int]] = []
    owners: list[np.ndarray] | None = []
    uses: list[np.ndarray] = []
    preemptions = 0
    t = 0
    while len(finished) < len(trace):
        if t > max_ticks:
            raise InvariantError(f"{backend.name}: trace not done after {max_ticks} ticks")
        for run in [r for r in running if r.generated == r.req.output_len]:
            backend.release(run)
            running.remove(run)
            finished[run.req.name] = t
            events.append(f"t={t:<3} {run.req.name} finished: released "
                          f"{run.reserved or run.req.final_len} {backend.unit}")
        while pending and trace[pending[0]].arrival <= t:
            waiting.append(pending.popleft())
        while waiting:
            head = waiting[0]
            run = head if isinstance(head, _Running) else _Running(trace[head], head, t)
            run.admitted = t
            need, reason = backend.try_admit(run, running)
            if reason is not None:
                free, hole = backend.free_blocks(), backend.largest_hole()
                refusals.append(Refusal(t, run.req.name, need, free, hole, reason,
                                        backend.layout(running)))
                if last_logged.get(run.req.name) != (free, hole, reason):
                    last_logged[run.req.name] = (free, hole, reason)
                    where = f", largest hole {hole}" if hole != free else ""
                    events.append(f"t={t:<3} {run.req.name} refused: needs {need}, {free} free"
                                  f"{where}: {reason}")
                break
            waiting.popleft()
            running.append(run)
            admitted.setdefault(run.req.name, t)
            events.append(f"t={t:<3} {run.req.name} admitted: {backend.describe_admit(run)}")
        victims = backend.grow(running)
        for victim in reversed(victims):  # the oldest victim ends up first in the queue
            running.remove(victim)
            victim.generated = 0
            waiting.appendleft(victim)
            preemptions += 1
            events.append(f"t={t:<3} {victim.req.name} preempted: slots freed, will recompute")
        for run in running:
            run.generated += 1
        used = sum(r.req.prompt_len + r.generated for r in running)
        series.append((used, backend.reserved(running), backend.free_blocks(),
                       backend.largest_hole(), len(running), len(waiting)))
        if owners is not None:
            if (t + 1) * n > _HISTORY_CELLS:
                owners = None
            else:
                owner = np.full(n, -1, dtype=np.int32)
                in_use = np.zeros(n, dtype=bool)
                backend.fill_owner(running, owner, in_use)
                owners.append(owner)
                uses.append(in_use)
        t += 1
    backend.finish_check()
    cols = np.array(series, dtype=np.int64).reshape(-1, 6).T
    return SimResult(
        allocator=backend.name, num_blocks=n, trace=trace, used=cols[0], reserved=cols[1],
        free=cols[2], largest_hole=cols[3], running=cols[4], waiting=cols[5], admitted=admitted,
        finished=finished, refusals=refusals, preemptions=preemptions, events=events,
        owner=np.stack(owners) if owners else None, in_use=np.stack(uses) if owners else None)


def simulate_contiguous(trace: list[TraceRequest], num_blocks: int, reserve: int | None = None,
                        max_ticks: int | None = None) -> SimResult:
    """Replay `trace` on a first-fit contiguous allocator over `num_blocks` blocks.

    Each request reserves prompt_len + max_new_tokens blocks, or `reserve` blocks when given (a
    cache that reserves the model's maximum length for everyone).
    """
    if reserve is not None and (not isinstance(reserve, int) or reserve < 1):
        raise ConfigError(f"reserve must be a positive integer, got {reserve!r}")
    return _simulate(trace, _Contiguous(_blocks(num_blocks), reserve), max_ticks)


def simulate_paged(trace: list[TraceRequest], num_blocks: int,
                   max_ticks: int | None = None) -> SimResult:
    """Replay `trace` on radixkv's `TokenToKVPool` with `num_blocks` one-token slots."""
    return _simulate(trace, _Paged(_blocks(num_blocks)), max_ticks)


def _blocks(num_blocks: Any) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ConfigError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    return num_blocks


@dataclass(frozen=True)
class Comparison:
    """Both allocators on one trace."""

    contiguous: SimResult
    paged: SimResult


def compare(trace: list[TraceRequest], num_blocks: int,
            reserve: int | None = None) -> Comparison:
    """Run the trace on both allocators."""
    return Comparison(simulate_contiguous(trace, num_blocks, reserve),
                      simulate_paged(trace, num_blocks))


# ---- reporting ---------------------------------------------------------------------------------
def layout_bar(layout: tuple[tuple[int, int, str | None], ...], num_blocks: int,
               width: int = 50) -> str:
    """One line drawing a block array: owner initials for allocations, '.' for free blocks."""
    owners = [o for _, _, o in layout if o]
    initials = [o[0] for o in owners]
    if len(set(initials)) == len(initials):  # A, B, C: draw each with its initial
        char = dict(zip(owners, initials, strict=True))
    else:  # r0, r5, r6, ...: letters in layout order (describe_layout names them)
        char = {o: "abcdefghijklmnopqrstuvwxyz"[i % 26] for i, o in enumerate(owners)}
    cells = []
    for c in range(width):
        block = c * num_blocks // width
        owner = next((o for s, n, o in layout if s <= block < s + n), None)
        cells.append(char[owner] if owner else ".")
    return "|" + "".join(cells) + "|"


def describe_layout(layout: tuple[tuple[int, int, str | None], ...]) -> str:
    """'[0,40) free, [40,80) B, [80,100) free'."""
    return ", ".join(f"[{s},{s + n}) {o or 'free'}" for s, n, o in layout)


def format_summary(cmp: Comparison) -> str:
    """The side-by-side table of both allocators' measurements."""
    c, p = cmp.contiguous, cmp.paged

    def both(f: Any) -> tuple[str, str]:
        return f(c), f(p)

    def frag_count(r: SimResult) -> str:
        refused = r.refused_despite_free()
        n = len({x.request for x in refused})
        return f"{len(refused)} ({n} request{'s' * (n != 1)})"

    rows = [
        ("requests served", both(lambda r: str(len(r.finished)))),
        ("ticks until the last request finished", both(lambda r: str(r.makespan))),
        ("concurrent requests: mean / peak",
         both(lambda r: f"{r.running[:r.makespan].mean():.2f} / {r.running.max()}")),
        ("KV in use (utilisation): mean / peak",
         both(lambda r: f"{r.utilisation()[:r.makespan].mean():.1%} / "
                        f"{r.utilisation().max():.1%}")),
        ("internal fragmentation (reserved, unused)",
         both(lambda r: f"{r.internal_fragmentation()[:r.makespan].mean():.1%}")),
        ("external fragmentation (free outside largest hole)",
         both(lambda r: f"{r.external_fragmentation()[:r.makespan].mean():.1%}")),
        ("admissions refused", both(lambda r: str(len(r.refusals)))),
        ("  of which with enough blocks free", both(frag_count)),
        ("preemptions", both(lambda r: str(r.preemptions))),
        ("mean wait from arrival to admission (ticks)", both(lambda r: f"{r.mean_wait():.1f}")),
        ("mean time from arrival to finish (ticks)", both(lambda r: f"{r.mean_latency():.1f}")),
    ]
    w = max(len(k) for k, _ in rows)
    wc = max(len("contiguous"), *(len(v[0]) for _, v in rows))
    wp = max(len("paged"), *(len(v[1]) for _, v in rows))
    lines = [f"  {'':<{w}}  {'contiguous':>{wc}}  {'paged':>{wp}}",
             f"  {'-' * w}  {'-' * wc}  {'-' * wp}"]
    lines += [f"  {k:<{w}}  {a:>{wc}}  {b:>{wp}}" for k, (a, b) in rows]
    return "\n".join(lines)


def format_report(cmp: Comparison, events: bool = True, title: str = "") -> str:
    """Header, optional event logs, the layout at the first fragmentation refusal, the table."""
    c = cmp.contiguous
    head = [title or f"Fragmentation simulator: {len(c.trace)} requests on {c.num_blocks} blocks",
            "  1 block = one token's KV. contiguous: first-fit, each request reserves "
            "prompt + max_new_tokens blocks;",
            "  paged: radixkv TokenToKVPool, one slot per token, taken from anywhere as tokens "
            "are produced."]
    out = "\n".join(head) + "\n"
    if events:
        for r in (cmp.contiguous, cmp.paged):
            out += f"\nEvents ({r.allocator}):\n" + "\n".join(f"  {e}" for e in r.events) + "\n"
    frag = c.refused_despite_free()
    if frag:
        f = frag[0]
        out += (f"\nFirst refusal with enough memory free (contiguous, t={f.tick}):\n"
                f"  {layout_bar(f.layout, c.num_blocks)}  0..{c.num_blocks}\n"
                f"  {describe_layout(f.layout)}\n"
                f"  {f.free} blocks free, but the largest hole is {f.largest_hole} "
                f"< {f.need} that {f.request} must reserve.\n")
        p_adm = cmp.paged.admitted.get(f.request)
        if p_adm is not None:
            out += (f"  Paged admitted {f.request} at t={p_adm}; contiguous at "
                    f"t={c.admitted[f.request]}.\n")
    return out + "\n" + format_summary(cmp)


def _block_image(r: SimResult) -> np.ndarray:
    """RGB image [num_blocks, ticks, 3]: a colour per request, pale where reserved but unused."""
    from matplotlib import colormaps

    assert r.owner is not None and r.in_use is not None
    palette = np.asarray(colormaps["tab10"].colors)  # [10, 3]
    owner = r.owner.T  # [blocks, ticks]
    img = np.ones(owner.shape + (3,))
    taken = owner >= 0
    img[taken] = palette[owner[taken] % len(palette)]
    pale = taken & ~r.in_use.T
    img[pale] = 0.35 * img[pale] + 0.65
    return img


def _spans(ticks: list[int]) -> list[tuple[int, int]]:
    """Sorted ticks -> [start, stop) runs of consecutive ticks (one shaded span per run)."""
    spans: list[tuple[int, int]] = []
    for t in ticks:
        if spans and spans[-1][1] == t:
            spans[-1] = (spans[-1][0], t + 1)
        else:
            spans.append((t, t + 1))
    return spans


def plot_comparison(cmp: Comparison, path: str | Path, title: str = "") -> Path:
    """Write a PNG: utilisation and concurrency over time, and both block maps over time.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    c, p = cmp.contiguous, cmp.paged
    has_maps = c.owner is not None and p.owner is not None
    fig = Figure(figsize=(12, 8.5 if has_maps else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if has_maps else 1, 2, height_ratios=[1, 1.3] if has_maps else [1])
    ax_u, ax_r = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    end = max(c.ticks, p.ticks)
    for r, color in ((c, "tab:red"), (p, "tab:blue")):
        x = np.arange(r.ticks)
        ax_u.step(x, 100 * r.utilisation(), where="post", color=color,
                  label=f"{r.allocator}: KV in use")
        ax_r.step(x, r.running, where="post", color=color, label=r.allocator)
    ax_u.step(np.arange(c.ticks), 100 * c.reserved / c.num_blocks, where="post",
              color="tab:red", linestyle="--", alpha=0.6, label="contiguous: reserved")
    for start, stop in _spans(sorted({f.tick for f in c.refused_despite_free()})):
        ax_u.axvspan(start, stop, color="tab:red", alpha=0.12, linewidth=0)
    ax_u.set(xlabel="tick", ylabel="% of blocks", ylim=(0, 105), xlim=(0, end),
             title="memory use (shaded: refused with enough free)")
    ax_r.set(xlabel="tick", ylabel="requests", xlim=(0, end), title="requests running")
    ax_r.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_u.legend(loc="lower right", fontsize=8)
    ax_r.legend(loc="upper right", fontsize=8)
    if has_maps:
        for col, r in enumerate((c, p)):
            ax = fig.add_subplot(grid[1, col])
            ax.imshow(_block_image(r), aspect="auto", interpolation="nearest", origin="lower",
                      extent=(0, r.ticks, 0, r.num_blocks))
            ax.set(xlabel="tick", ylabel="block", xlim=(0, end),
                   title=(f"{r.allocator}: block owners over time (pale = reserved, unused)"
                          if r.allocator == "contiguous" else
                          f"{r.allocator}: slot owners over time (slot = block + 1)"))
            frag = r.refused_despite_free()
            if frag and len(r.trace) <= 10:  # small traces: point at the first such refusal
                f = frag[0]
                hole = max((p for p in f.layout if p[2] is None), key=lambda p: p[1])
                ax.annotate(f"{f.request} refused: needs {f.need} adjacent,\n{f.free} free, "
                            f"largest hole {f.largest_hole}",
                            xy=(f.tick + 0.2, hole[0] + hole[1] / 2), fontsize=8, ha="left",
                            va="center",
                            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
            if len(r.trace) <= 10:  # name the colours when there are few requests
                palette = colormaps["tab10"].colors
                ax.legend(handles=[Patch(color=palette[i % 10], label=q.name)
                                   for i, q in enumerate(r.trace)], loc="upper right",
                          fontsize=8)
    fig.suptitle(title or f"{len(c.trace)} requests on {c.num_blocks} blocks")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
