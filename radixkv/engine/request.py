"""`Request`: one generation request and its place in the three memory levels."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from radixkv.engine.detokenizer import IncrementalDetokenizer
from radixkv.engine.sampling_params import SamplingParams
from radixkv.memory.base_cache import CacheNode


class Status(enum.Enum):
    WAITING = "waiting"  # queued; owns no slots and no row
    RUNNING = "running"  # has a row, a locked tree node and its own slots
    FORKED = "forked"  # a parent whose samples / beams run (see `samples`); holds no memory
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """A request's tokens, progress and memory.

    Memory of a RUNNING request, by position in its row of `req_to_token`:

    | positions               | slots owned by | released when                               |
    |-------------------------|----------------|---------------------------------------------|
    | [0, cached_len)         | the tree       | never by the request: it only unlocks `node` |
    | [cached_len, kv_len)    | the request    | finish / preempt / abort (after tree insert) |

    `kv_len` counts tokens whose K/V are in the pool; the last sampled token has none yet.

    Forks (parallel samples, beams): the request a caller submits is the *parent*. It prefills
    the prompt once; at its first sample it forks into `samples` (Requests with `parent` set,
    each its own row, all locking the parent's tree node) and turns FORKED, holding nothing.
    With `n > 1` the n samples are created at submission (sample i's generator is seeded with
    `seed + i`); with beam search (`beam` set) `samples` is the current set of live beams.
    The prompt and the generated tokens live in one int32 buffer sized for the whole request, so
    `token_ids()` is a view, never a concatenation.
    """

    rid: str
    prompt_ids: np.ndarray  # int32 [P]
    params: SamplingParams
    namespace: Any = None
    prompt: str | None = None  # the prompt text, when the caller gave text
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    row: int = -1
    node: CacheNode | None = None  # locked tree node covering [0, cached_len)
    cached_len: int = 0
    kv_len: int = 0
    prefix_hit: int = -1  # tree hit at first admission (-1: not admitted yet)
    prefill_tokens: int = 0  # tokens this request sent through extend (recomputes included)
    preemptions: int = 0
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: BaseException | None = None  # set when finish_reason == "error"
    detokenizer: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    tier_lookup: Any = None  # KV tier: None unchecked, a Future in flight, True once settled
    logprobs: list[dict[int, float]] | None = None  # per generated token, when asked for
    cumulative_logprob: float = 0.0
    arrival: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finish_time: float | None = None
    parent: Request | None = None  # the submitted request this one is a sample / beam of
    samples: list[Request] | None = None  # on a parent: its samples (n > 1) or live beams
    index: int = 0  # sample index within the parent
    beam: Any = None  # on a beam-search parent: its `BeamState`
    fork_slots: torch.Tensor | None = None  # on a parent: slots reserved for this step's forks
    reserved_rows: int = 0  # on a parent before its fork: rows kept back for its samples
    _seq: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        self._seq = np.empty(n + self.params.max_tokens, dtype=np.int32)
        self._seq[:n] = self.prompt_ids
        if self.params.logprobs is not None:
            self.logprobs = []

    def token_ids(self) -> np.ndarray:
        """Prompt followed by the generated tokens, int32 (a view: do not modify)."""
        return self._seq[:self.total_len]

    def copy_tokens_from(self, src: Request) -> None:
        """Take `src`'s generated tokens (a fork starts where its source is)."""
        n = src.total_len
        self._seq[:n] = src._seq[:n]
        self.output_ids = list(src.output_ids)

    @property
    def group(self) -> Request:
        """The submitted request this sequence belongs to (itself when not a fork)."""
        return self.parent if self.parent is not None else self

    @property
    def is_beam(self) -> bool:
        return self.group.beam is not None

    @property
    def width(self) -> int:
        """Sequences this request forks into: n, or the beam width."""
        return self.beam.width if self.beam is not None else self.params.n

    @property
    def pending_fork(self) -> bool:
        """A running parent that forks at its next sample (n > 1 or beam search)."""
        return (self.status is Status.RUNNING and self.parent is None
                and (self.beam is not None or self.params.n > 1))

    def append_token(self, tok: int) -> None:
        self._seq[self.total_len] = tok
        self.output_ids.append(tok)

    @property
    def text(self) -> str:
        """The output text so far (stop string cut once finished)."""
        return self.detokenizer.text if self.detokenizer is not None else ""

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """True while more than the last token lacks K/V (extend); else the next step decodes.

        A fresh request extends its prompt and samples from the last position; a preempted one
        extends prompt + output so far. Either way, once kv_len == total_len - 1, a decode step
        feeds the last token, which is exactly an extend of one token.
        """
        return self.kv_len < self.total_len - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
