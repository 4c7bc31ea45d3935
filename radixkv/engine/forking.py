"""The engine's side of forks: finishing a request with many sequences, one beam-search step,
and the outputs and slot maps of forked requests.

Memory moves (who owns which slot when a sequence forks, is pruned or ends) are the
scheduler's (`Scheduler.fork`, `Scheduler.prune`); this module decides *what* forks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchSequence, Continuation
from radixkv.engine.request import Request, Status

if TYPE_CHECKING:
    from radixkv.engine.scheduler import Scheduler


class ForkingMixin:
    """Mixed into `Engine`: group-level finishing and beam search steps."""

    scheduler: Scheduler
    requests: dict[str, Request]
    tokenizer: Any

    def _count_finish(self, reason: str) -> None:  # provided by Engine
        raise NotImplementedError

    # ---- finishing a whole request -----------------------------------------------------------
    def _finish_group(self, group: Request, reason: str) -> None:
        """End `group` now ("abort" / "error"): every running sample or beam releases its
        memory (a parent that has not forked yet releases its own)."""
        now = time.time()
        forked = group.status is Status.FORKED
        if not forked:
            self.scheduler.finish(group, reason)
            self.scheduler.drop_fork_slots(group)
        for s in group.samples or ():
            if s.finished:
                continue
            if forked:
                self.scheduler.finish(s, reason)
            else:  # created at submission, never ran: owns nothing
                s.status, s.finish_reason = Status.FINISHED, reason
            s.finish_time = now
            if s.detokenizer is not None:
                s.detokenizer.finish()
        group.status, group.finish_reason, group.finish_time = Status.FINISHED, reason, now
        if group.detokenizer is not None:
            group.detokenizer.finish()
        self._count_finish(reason)

    # ---- beam search -------------------------------------------------------------------------
    def _beam_step(self, group: Request, seqs: Sequence[Request],
                   cands: Sequence[tuple[list[int], list[float]] | None]) -> None:
        """Choose the next live beams of `group` from this step's candidates and move memory:
        beams without a continuation are pruned, a beam with k continuations keeps the first
        and forks k - 1 copies (sharing its prefix in the tree)."""
        state = group.beam
        first = group.status is Status.RUNNING  # the parent itself sampled: step 0
        live = [group] if first else list(group.samples)
        by_seq = {id(s): c for s, c in zip(seqs, cands, strict=True)}
        got = [by_seq[id(b)] for b in live]
        conts = state.step([b.output_ids for b in live], [b.cumulative_logprob for b in live],
                           [c[0] for c in got], [c[1] for c in got])
        if state.done:
            self._close_beams(group)
            return
        if first:
            children = [self._new_beam(group) for _ in conts]
            self.scheduler.fork(group, children, [c.token for c in conts], owner=group,
                                src_continues=False)
            for child, c in zip(children, conts, strict=True):
                child.cumulative_logprob = c.cum_logprob
            group.samples = children
        else:
            by_src: dict[int, list[tuple[int, Continuation]]] = {}
            for rank, c in enumerate(conts):
                by_src.setdefault(c.src, []).append((rank, c))
            for b, beam in enumerate(live):  # prune first: their rows serve the forks
                if b not in by_src:
                    self.scheduler.prune(beam)
            nxt: list[Request | None] = [None] * len(conts)
            for b, picks in by_src.items():
                beam = live[b]
                extra = [self._new_beam(group) for _ in picks[1:]]
                if extra:  # forks copy the beam's tokens before it takes its own next one
                    self.scheduler.fork(beam, extra, [c.token for _, c in picks[1:]],
                                        owner=group, src_continues=True)
                beam.append_token(picks[0][1].token)
                for seq, (rank, c) in zip([beam, *extra], picks, strict=True):
                    seq.cumulative_logprob = c.cum_logprob
                    nxt[rank] = seq
            group.samples = [s for s in nxt if s is not None]
        self.scheduler.drop_fork_slots(group)

    def _new_beam(self, group: Request) -> Request:
        beam = Request(f"{group.rid}/beam", group.prompt_ids, group.params, group.namespace,
                       prompt=group.prompt)
        beam.parent = group
        return beam

    def _close_beams(self, group: Request) -> None:
        """The search is over: release every live beam and fix the returned sequences."""
        if group.status is Status.RUNNING:  # done at step 0 (max_tokens == 1)
            self.scheduler.finish(group, "stop")
        for beam in group.samples or ():
            if beam.status is Status.RUNNING:
                self.scheduler.finish(beam, "stop")
        self.scheduler.drop_fork_slots(group)
        group.samples = []
        state = group.beam
        for hyp in state.finished:
            hyp.text = self.tokenizer.decode(hyp.token_ids, skip_special_tokens=True)
        reason = state.finished[0].finish_reason if state.finished else "stop"
        group.status, group.finish_reason, group.finish_time = (Status.FINISHED, reason,
                                                                time.time())
        self._count_finish(reason)

    # ---- introspection -----------------------------------------------------------------------
    def sequence_slots(self, rid: str) -> dict[str, np.ndarray]:
        """The KV slots each running sequence of request `rid` reads, by name ("rid/i"):
        positions [0, kv_len) of its row. Shared prefix slots appear under every sample; pass
        the result as `running` to `radixkv.tools.viz.memory_map` to draw the sharing."""
        req = self.requests[rid]
        seqs = req.samples if req.status is Status.FORKED else [req]
        out = {}
        for i, s in enumerate(seqs):
            if s.status is Status.RUNNING and s.row >= 0:
                out[f"{rid}/{i}"] = self.scheduler._row_slots(s, s.kv_len)
        return out


def beam_output(group: Request) -> BeamSearchOutput:
    """The result of a beam search (best first; empty until it finishes)."""
    state = group.beam
    done = group.finished
    seqs = [BeamSearchSequence(h.token_ids, h.text, h.cum_logprob, h.finish_reason, h.score)
            for h in state.finished] if done and group.finish_reason not in ("abort", "error") \
        else []
    return BeamSearchOutput(group.rid, group.prompt, group.prompt_ids.tolist(), seqs, done,
                            group.finish_reason if done else None)
