"""Request traces: one request's arrival tick, prompt length, tokens it really generates and the
`max_new_tokens` it asked for; the seed teaching scenario, seeded random traces, JSON files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radixkv.errors import ConfigError

SEED_BLOCKS = 100


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
