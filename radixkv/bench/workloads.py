"""Token-level workload generators: seeded request traces with known prefix sharing, no downloads.

A trace is a list of requests in arrival order. Request i's prompt is the full sequence of its
`parent` (the parent's prompt followed by the parent's answer) followed by `new_tokens`, so a
multi-turn chat turn or a tree-of-thought branch extends what came before it. `answer` is the
scripted output: memory-level runs feed it as the "sampled" tokens; model-level runs generate
len(answer) tokens and build children from what the model really produced. A child can only
arrive once its parent has finished.

Workloads (`WORKLOADS`):
1. shared-system: N users, one long system prompt, short distinct questions.
2. multi-turn: chat sessions behind a short shared system prompt; each turn extends the previous
   prompt and answer; sessions interleaved at random.
3. few-shot: a few tasks, each with k shared examples behind one instruction; different questions.
4. tree-of-thought: roots fan out into branches; each branch (prompt plus answer) fans out again.
5. no-sharing: distinct prompts (distinct first tokens): the control.
6. mixed: smaller copies of 1-5 interleaved; runs with a pool holding a fraction of the working
   set (`capacity_fraction`).

Every size comes from `SIZES[workload][size_key]`, size_key one of "memory-quick",
"memory-full", "model-quick", "model-full". Token ids are drawn from [TOKEN_LO, TOKEN_HI), inside
the default model's vocabulary and clear of its special tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOKEN_LO, TOKEN_HI = 100, 49_000  # SmolLM2 vocabulary is 49152; ids < 100 hold special tokens
SIZE_KEYS = ("memory-quick", "memory-full", "model-quick", "model-full")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace (token ids int32)."""

    parent: int  # index of an earlier request whose prompt + answer this prompt extends; -1: none
    new_tokens: np.ndarray  # int32 [n] appended after the parent's sequence
    answer: np.ndarray  # int32 [m >= 1] scripted output; model runs generate m tokens
    group: str  # where it comes from, e.g. "session 3" (for reading traces)


@dataclass
class Trace:
    """A workload instance: requests in arrival order plus how to run it."""

    name: str
    title: str
    requests: list[TraceRequest]
    capacity_fraction: float | None = None  # pool = this share of the working set; None: ample
    notes: str = ""
    _prompts: list[np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.requests)

    def prompt(self, i: int, outputs: Sequence[np.ndarray | None]) -> np.ndarray:
        """Prompt of request i given the outputs produced so far (int32 [L]).

        `outputs[j]` is request j's generated tokens; only i's ancestors are read, and they must
        be finished (not None).
        """
        chain = []
        j = i
        while j >= 0:
            chain.append(j)
            j = self.requests[j].parent
        parts: list[np.ndarray] = []
        for j in reversed(chain):
            parts.append(self.requests[j].new_tokens)
            if j != i:
                out = outputs[j]
                if out is None:
                    raise ValueError(f"request {i} needs request {j}'s output first")
                parts.append(np.asarray(out, dtype=np.int32))
        return np.concatenate(parts).astype(np.int32, copy=False)

    def scripted_prompts(self) -> list[np.ndarray]:
        """Every prompt with the scripted answers as outputs (cached)."""
        if self._prompts is None:
            answers = [r.answer for r in self.requests]
            self._prompts = [self.prompt(i, answers) for i in range(len(self.requests))]
        return self._prompts

    def max_tokens(self, i: int) -> int:
        return int(len(self.requests[i].answer))

    def max_total_len(self) -> int:
        """Longest prompt + answer (the request row length a run needs)."""
        prompts = self.scripted_prompts()
        return max(len(p) + self.max_tokens(i) for i, p in enumerate(prompts))

    def check(self) -> None:
        """Parents come before children; every request has tokens and a non-empty answer."""
        for i, r in enumerate(self.requests):
            if not -1 <= r.parent < i:
                raise ValueError(f"{self.name}: request {i} has parent {r.parent}")
            if len(r.new_tokens) == 0 or len(r.answer) == 0:
                raise ValueError(f"{self.name}: request {i} has no new tokens or no answer")


# ---- generators ---------------------------------------------------------------------------------
def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(TOKEN_LO, TOKEN_HI, size=int(n), dtype=np.int32)


def _length(rng: np.random.Generator, span: tuple[int, int]) -> int:
    lo, hi = span
    return int(rng.integers(lo, hi + 1))


def shared_system(rng: np.random.Generator, users: int, system_len: int,
                  question_len: tuple[int, int], answer_len: tuple[int, int]) -> list[TraceRequest]:
    system = _tokens(rng, system_len)
    return [TraceRequest(-1, np.concatenate([system, _tokens(rng, _length(rng, question_len))]),
                         _tokens(rng, _length(rng, answer_len)), f"user {u}")
            for u in range(users)]


def multi_turn(rng: np.random.Generator, sessions: int, turns: int, system_len: int,
               user_len: tuple[int, int], answer_len: tuple[int, int]) -> list[TraceRequest]:
    system = _tokens(rng, system_len)
    remaining = [turns] * sessions
    last = [-1] * sessions
    out: list[TraceRequest] = []
    while any(remaining):
        live = [s for s in range(sessions) if remaining[s]]
        s = live[int(rng.integers(len(live)))]  # interleave sessions at random
        user = _tokens(rng, _length(rng, user_len))
        new = np.concatenate([system, user]) if last[s] < 0 else user
        out.append(TraceRequest(last[s], new, _tokens(rng, _length(rng, answer_len)),
                                f"session {s} turn {turns - remaining[s]}"))
        last[s] = len(out) - 1
        remaining[s] -= 1
    return out


def few_shot(rng: np.random.Generator, requests: int, tasks: int, shots: int, example_len: int,
             instruction_len: int, question_len: tuple[int, int],
             answer_len: tuple[int, int]) -> list[TraceRequest]:
    instruction = _tokens(rng, instruction_len)
    prefixes = [np.concatenate([instruction, *(_tokens(rng, example_len) for _ in range(shots))])
                for _ in range(tasks)]
    out = []
    for i in range(requests):
        t = int(rng.integers(tasks))
        out.append(TraceRequest(-1, np.concatenate([prefixes[t],
                                                    _tokens(rng, _length(rng, question_len))]),
                                _tokens(rng, _length(rng, answer_len)), f"task {t} question {i}"))
    return out


def tree_of_thought(rng: np.random.Generator, trees: int, root_len: int, branches: int,
                    sub_branches: int, step_len: tuple[int, int],
                    answer_len: tuple[int, int]) -> list[TraceRequest]:
    """Per tree: `branches` requests on root + a branch instruction, then for each of them
    `sub_branches` requests extending that branch's prompt and answer. Trees interleave."""
    per_tree: list[list[tuple[int, np.ndarray, str]]] = []  # (local parent, new tokens, group)
    for t in range(trees):
        root = _tokens(rng, root_len)
        reqs: list[tuple[int, np.ndarray, str]] = []
        for b in range(branches):
            reqs.append((-1, np.concatenate([root, _tokens(rng, _length(rng, step_len))]),
                         f"tree {t} branch {b}"))
        for b in range(branches):
            for c in range(sub_branches):
                reqs.append((b, _tokens(rng, _length(rng, step_len)), f"tree {t} branch {b}.{c}"))
        per_tree.append(reqs)
    return _interleave(rng, [[TraceRequest(p, new, _tokens(rng, _length(rng, answer_len)), g)
                              for p, new, g in reqs] for reqs in per_tree])


def no_sharing(rng: np.random.Generator, requests: int, prompt_len: tuple[int, int],
               answer_len: tuple[int, int]) -> list[TraceRequest]:
    firsts = rng.permutation(np.arange(TOKEN_LO, TOKEN_HI, dtype=np.int32))[:requests]
    out = []
    for i in range(requests):  # distinct first tokens: no two prompts share even one token
        p = _tokens(rng, _length(rng, prompt_len))
        p[0] = firsts[i]
        out.append(TraceRequest(-1, p, _tokens(rng, _length(rng, answer_len)), f"prompt {i}"))
    return out


def _interleave(rng: np.random.Generator,
                parts: list[list[TraceRequest]]) -> list[TraceRequest]:
    """Merge sub-traces at random, keeping each one's order; parents are re-indexed."""
    order = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)]).astype(np.int64)
    rng.shuffle(order)
    pos = [0] * len(parts)
    new_index: list[dict[int, int]] = [{} for _ in parts]
    out: list[TraceRequest] = []
    for k in order.tolist():
        local = pos[k]
        pos[k] += 1
        r = parts[k][local]
        parent = new_index[k][r.parent] if r.parent >= 0 else -1
        new_index[k][local] = len(out)
        out.append(TraceRequest(parent, r.new_tokens, r.answer, r.group))
    return out


# ---- sizes ---------------------------------------------------------------------------------------
# Memory-level runs replay long traces (no model); model-level runs stay modest on a CPU.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "shared-system": {
        "memory-quick": dict(users=60, system_len=300, question_len=(8, 24),
                             answer_len=(4, 12)),
        "memory-full": dict(users=400, system_len=1200, question_len=(16, 48),
                            answer_len=(8, 32)),
        "model-quick": dict(users=8, system_len=96, question_len=(6, 12), answer_len=(6, 6)),
        "model-full": dict(users=12, system_len=256, question_len=(8, 16),
                           answer_len=(16, 16)),
    },
    "multi-turn": {
        "memory-quick": dict(sessions=10, turns=5, system_len=24, user_len=(8, 24),
                             answer_len=(8, 24)),
        "memory-full": dict(sessions=70, turns=8, system_len=48, user_len=(16, 64),
                            answer_len=(24, 96)),
        "model-quick": dict(sessions=3, turns=3, system_len=16, user_len=(6, 12),
                            answer_len=(6, 6)),
        "model-full": dict(sessions=3, turns=4, system_len=32, user_len=(12, 24),
                           answer_len=(16, 16)),
    },
    "few-shot": {
        "memory-quick": dict(requests=60, tasks=3, shots=4, example_len=40,
                             instruction_len=16, question_len=(8, 20), answer_len=(4, 12)),
        "memory-full": dict(requests=400, tasks=4, shots=8, example_len=96,
                            instruction_len=40, question_len=(16, 48), answer_len=(8, 32)),
        "model-quick": dict(requests=8, tasks=2, shots=3, example_len=24, instruction_len=8,
                            question_len=(6, 12), answer_len=(6, 6)),
        "model-full": dict(requests=12, tasks=2, shots=3, example_len=64, instruction_len=16,
                           question_len=(8, 16), answer_len=(16, 16)),
    },
    "tree-of-thought": {
        "memory-quick": dict(trees=4, root_len=160, branches=3, sub_branches=3,
                             step_len=(8, 24), answer_len=(8, 24)),
        "memory-full": dict(trees=20, root_len=600, branches=4, sub_branches=4,
                            step_len=(24, 64), answer_len=(32, 96)),
        "model-quick": dict(trees=1, root_len=64, branches=2, sub_branches=2, step_len=(6, 12),
                            answer_len=(6, 6)),
        "model-full": dict(trees=2, root_len=128, branches=2, sub_branches=2, step_len=(8, 16),
                           answer_len=(16, 16)),
    },
    "no-sharing": {
        "memory-quick": dict(requests=50, prompt_len=(100, 300), answer_len=(4, 12)),
        "memory-full": dict(requests=300, prompt_len=(300, 900), answer_len=(8, 32)),
        "model-quick": dict(requests=8, prompt_len=(60, 100), answer_len=(6, 6)),
        "model-full": dict(requests=12, prompt_len=(100, 200), answer_len=(16, 16)),
    },
}
# mixed: smaller copies of the others (their sizes divided by MIXED_DIVISOR, at least 1)
MIXED_DIVISOR = {"memory-quick": 2, "memory-full": 3, "model-quick": 2, "model-full": 4}
MIXED_CAPACITY_FRACTION = 0.10
_COUNT_KEYS = ("users", "sessions", "requests", "trees")

_BUILDERS: dict[str, Callable[..., list[TraceRequest]]] = {
    "shared-system": shared_system, "multi-turn": multi_turn, "few-shot": few_shot,
    "tree-of-thought": tree_of_thought, "no-sharing": no_sharing,
}
TITLES = {
    "shared-system": "Shared system prompt",
    "multi-turn": "Multi-turn chat",
    "few-shot": "Few-shot",
    "tree-of-thought": "Tree of thought",
    "no-sharing": "No sharing (control)",
    "mixed": "Mixed trace under capacity pressure",
}
WORKLOADS = tuple(TITLES)


def _describe(name: str, p: dict[str, Any]) -> str:
    if name == "shared-system":
        return (f"{p['users']} users, {p['system_len']}-token system prompt, questions "
                f"{p['question_len'][0]}-{p['question_len'][1]} tokens")
    if name == "multi-turn":
        return (f"{p['sessions']} sessions x {p['turns']} turns, user turns "
                f"{p['user_len'][0]}-{p['user_len'][1]} tokens, {p['system_len']}-token system")
    if name == "few-shot":
        return (f"{p['requests']} questions over {p['tasks']} tasks x {p['shots']} shots of "
                f"{p['example_len']} tokens")
    if name == "tree-of-thought":
        return (f"{p['trees']} trees: {p['root_len']}-token root -> {p['branches']} branches -> "
                f"{p['sub_branches']} each")
    return f"{p['requests']} prompts of {p['prompt_len'][0]}-{p['prompt_len'][1]} tokens"


def build(name: str, size_key: str, seed: int) -> Trace:
    """The trace of workload `name` at `size_key`; the same (name, size_key, seed) gives the same
    tokens every time."""
    if name not in TITLES:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if size_key not in SIZE_KEYS:
        raise ValueError(f"unknown size {size_key!r}; choose from {', '.join(SIZE_KEYS)}")
    # one stream per (workload, seed): adding a workload never changes another's tokens
    rng = np.random.default_rng([seed, WORKLOADS.index(name)])
    answer_note = "answers scripted (memory level) or generated with the same lengths (model)"
    if name != "mixed":
        params = SIZES[name][size_key]
        trace = Trace(name, TITLES[name], _BUILDERS[name](rng, **params),
                      notes=f"{_describe(name, params)}; {answer_note}")
    else:
        div = MIXED_DIVISOR[size_key]
        parts = []
        for sub in _BUILDERS:
            params = dict(SIZES[sub][size_key])
            for key in _COUNT_KEYS:
                if key in params:
                    params[key] = max(1, params[key] // div)
            parts.append(_BUILDERS[sub](rng, **params))
        trace = Trace(name, TITLES[name], _interleave(rng, parts),
                      capacity_fraction=MIXED_CAPACITY_FRACTION,
                      notes=(f"workloads 1-5 at 1/{div} size, interleaved; KV pool = "
                             f"{MIXED_CAPACITY_FRACTION:.0%} of the working set"))
    trace.check()
    return trace
