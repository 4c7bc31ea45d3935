"""Beam search inside the engine: its parameters, its outputs and the per-request search state.

The live beams of a request are forks of one another (see `Scheduler.fork`): they share their
common prefix KV through the radix tree, a pruned beam frees only its own tail, no beam is ever
re-prefilled, and the live beams decode as one batch per step together with every other request.

Selection follows Hugging Face transformers' `generate(num_beams=W, do_sample=False,
early_stopping=True, length_penalty=L)` step for step:

1. Each live beam's next-token log-probabilities (the model's own distribution) are added to the
   beam's cumulative log-probability; the best K = max(2, 1 + #EOS ids) x W (beam, token)
   candidates over all beams are kept, best first.
2. A candidate ending in EOS, or reaching `max_tokens`, is finished. Finished candidates ranked
   in the top W join the finished set with score cum_logprob / generated_len ** L (the length
   counts the EOS token), while that set holds fewer than W; the set keeps its best W.
3. The best W unfinished candidates are the next live beams.
4. The search ends once W sequences have finished (early stopping), when the best live beam can
   no longer beat the worst finished one, or at `max_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from radixkv.engine.sampling_params import SamplingParams
from radixkv.errors import InvalidRequestError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class BeamSearchParams:
    """Settings of one beam search (vLLM's names).

    - `beam_width` beams are kept; `beam_width` sequences are returned, best first.
    - `max_tokens` bounds each sequence's generated tokens.
    - `length_penalty` L: a finished sequence scores cum_logprob / len ** L (L > 0 favours long
      sequences, L = 0 ranks by cum_logprob alone).
    - `ignore_eos`: EOS is an ordinary token; every sequence runs to `max_tokens`.
    - `stop`: beam search ranks sequences by token log-probabilities, so it does not stop on
      strings; any stop string is rejected (`InvalidRequestError`) rather than ignored.
    Invalid values raise `InvalidRequestError` at construction.
    """

    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    stop: str | list[str] | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"BeamSearchParams: {msg}")

        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise bad(f"beam_width must be an int >= 1, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, int | float) or not math.isfinite(lp):
            raise bad(f"length_penalty must be a finite number, got {lp!r}")
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.stop:
            raise bad("beam search does not support stop strings (it ranks whole sequences by "
                      "log-probability); cut the returned text instead")

    def sampling_params(self) -> SamplingParams:
        """The per-beam settings the engine runs with (greedy rows, no penalties)."""
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos)


@dataclass(slots=True)
class BeamSearchSequence:
    """One returned sequence: `token_ids` are the generated tokens only (EOS included when it
    ended the sequence), `cum_logprob` their summed log-probability, `score` the ranking value
    cum_logprob / len(token_ids) ** length_penalty; `finish_reason` "stop" (EOS) or "length"."""

    token_ids: list[int]
    text: str
    cum_logprob: float
    finish_reason: str | None
    score: float = 0.0


@dataclass(slots=True)
class BeamSearchOutput:
    """The result of one beam search: `sequences`, best first, `beam_width` of them."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]
    finished: bool = True
    finish_reason: str | None = None  # "abort" or "error" when the search did not complete


@dataclass(slots=True)
class Hypothesis:
    """A finished sequence of the search."""

    token_ids: list[int]
    cum_logprob: float
    score: float
    finish_reason: str
    text: str = ""  # decoded when the search ends


@dataclass(slots=True)
class Continuation:
    """A live beam of the next step: beam `src` of this step extended by `token`."""

    src: int
    token: int
    cum_logprob: float


@dataclass(slots=True)
class BeamState:
    """The search state of one request (see the module docstring for the rules)."""

    width: int
    max_tokens: int
    length_penalty: float
    eos_ids: frozenset[int]
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most `width`
    can_improve: bool = True
    done: bool = False

    @property
    def num_candidates(self) -> int:
        """Candidates kept per step (and top log-probabilities needed per beam)."""
        return max(2, 1 + len(self.eos_ids)) * self.width

    def reset(self) -> None:
        """Start over (the search was preempted)."""
        self.finished.clear()
        self.can_improve, self.done = True, False

    def step(self, outputs: Sequence[list[int]], cum: Sequence[float],
             cand_ids: Sequence[Sequence[int]], cand_lps: Sequence[Sequence[float]]
             ) -> list[Continuation]:
        """One step over the live beams: beam b has generated `outputs[b]` with cumulative
        log-probability `cum[b]`; `cand_ids[b]` / `cand_lps[b]` are its top next tokens and
        their log-probabilities (at least `num_candidates`, best first). Returns the next live
        beams, best first (empty once `done`)."""
        k = self.num_candidates
        gen = len(outputs[0]) + 1  # generated length after this step (all beams are in step)
        cands = [(cum[b] + lp, b, tok) for b in range(len(outputs))
                 for tok, lp in zip(cand_ids[b][:k], cand_lps[b][:k], strict=True)]
        cands.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then token rank
        cands = cands[:k]
        at_max = gen >= self.max_tokens
        hits = [at_max or tok in self.eos_ids for _, _, tok in cands]
        if len(self.finished) < self.width and self.can_improve:
            denom = gen ** self.length_penalty
            new = [Hypothesis([*outputs[b], tok], total, total / denom,
                              "length" if at_max and tok not in self.eos_ids else "stop")
                   for rank, ((total, b, tok), hit) in enumerate(zip(cands, hits, strict=True))
                   if hit and rank < self.width]
            if new:
                merged = self.finished + new
                merged.sort(key=lambda h: -h.score)  # stable: earlier finishers win ties
                self.finished = merged[:self.width]
        live = [Continuation(b, tok, total)
                for (total, b, tok), hit in zip(cands, hits, strict=True) if not hit][:self.width]
        if len(self.finished) == self.width and live:
            best = live[0].cum_logprob / gen ** self.length_penalty
            self.can_improve = self.can_improve and best > self.finished[-1].score
        self.done = (not live or not self.can_improve or len(self.finished) == self.width)
        return [] if self.done else live
