"""`SamplingParams`: how one request's tokens are chosen and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from radixkv.errors import InvalidRequestError

MAX_LOGPROBS = 20  # most top-k logprobs a request may ask for (OpenAI's limit)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and not math.isnan(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class SamplingParams:
    """Sampling and stopping settings of one request (vLLM's names and meanings).

    - `temperature` 0 means greedy. `top_k` -1 and `top_p` 1.0 disable those filters; `min_p`
      keeps tokens whose probability is at least min_p times the most likely token's.
    - Penalties (applied to the logits before temperature): `repetition_penalty` > 1 divides a
      positive logit (multiplies a negative one) of every token already in the prompt or the
      output; `frequency_penalty` subtracts penalty x count of each token in the output so far;
      `presence_penalty` subtracts the penalty once for each token present in the output.
      `logit_bias` adds a bias to given token ids.
    - `min_tokens`: EOS and `stop_token_ids` are blocked, and stop strings not looked for, until
      this many tokens are generated.
    - Stopping: `stop` strings end the request and are cut from the text (kept with
      `include_stop_str_in_output`); `stop_token_ids` and EOS (unless `ignore_eos`) end it too;
      `max_tokens` bounds the output.
    - `logprobs=k` returns, for every generated token, the log-probabilities (of the model's
      distribution, before penalties and temperature) of the sampled token and the top k.
    - A `seed` makes the request's samples reproducible whatever it is batched with.
    - `n` parallel samples share the prompt's KV: it is prefilled once and forked in the engine
      (with temperature 0 they are all equal). With a `seed`, sample i draws from a generator
      seeded with `seed + i`, so it equals a separate request with seed `seed + i`, whatever
      either is batched with; without one, samples draw from the engine's shared generator.
    Invalid values raise `InvalidRequestError` at construction.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 64
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"SamplingParams: {msg}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise bad(f"{name} must be a number, got {getattr(self, name)!r}")
        if not _is_int(self.n) or self.n < 1:
            raise bad(f"n must be an int >= 1, got {self.n!r}")
        if self.temperature < 0 or math.isinf(self.temperature):
            raise bad(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            raise bad(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad(f"min_tokens must be an int in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0 or math.isinf(self.repetition_penalty):
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad(f"seed must be a non-negative int, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                      f"got {self.logprobs!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop must be a non-empty string or a list of them")
        self.stop_strings = tuple(stops)
        ids = list(self.stop_token_ids or [])
        if any(not _is_int(t) or t < 0 for t in ids):
            raise bad("stop_token_ids must be non-negative ints")
        self.stop_token_ids = ids
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    not _is_int(k) or k < 0 or not _is_number(v) or math.isinf(v)
                    for k, v in self.logit_bias.items()):
                raise bad("logit_bias must map non-negative token ids to finite numbers")
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
