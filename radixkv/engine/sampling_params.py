"""`SamplingParams`: how one request's tokens are chosen and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from radixkv.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """Sampling and stopping settings of one request (vLLM's names and meanings).

    temperature 0 means greedy. top_k -1 and top_p 1.0 disable those filters; min_p keeps tokens
    whose probability is at least min_p times the most likely token's. `stop` strings end the
    request and are cut from the text; `stop_token_ids` and EOS (unless `ignore_eos`) end it too.
    A `seed` makes the request's samples reproducible whatever it is batched with.
    Invalid values raise `InvalidRequestError` at construction.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 64
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"SamplingParams: {msg}")

        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise bad(f"{name} must be a number, got {value!r}")
        if self.temperature < 0 or math.isinf(self.temperature):
            raise bad(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or (
                self.top_k < 1 and self.top_k != -1):
            raise bad(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or (
                self.max_tokens < 1):
            raise bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad(f"seed must be a non-negative int, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop must be a non-empty string or a list of them")
        self.stop_strings = tuple(stops)
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise bad("stop_token_ids must be non-negative ints")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
