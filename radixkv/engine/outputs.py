"""What a request returns: a `RequestOutput` with one `CompletionOutput` per sample (vLLM's shapes).

Outputs are snapshots: a streaming caller receives a new, cumulative `RequestOutput` after each
step that changed its request, the last one with `finished=True`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (index 0..n-1).

    `finish_reason` is None while running, then "stop" (EOS, a stop token or a stop string),
    "length" (max_tokens), "abort" or "error". `stop_reason` is the stop string or stop token id
    that ended it (None for EOS and the other reasons). `logprobs` (when asked for) holds, per
    generated token, {token id: logprob} of the sampled token and the top-k.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to the end."""
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt, its `outputs` (n samples) and timings.

    `num_cached_tokens` counts prompt tokens whose KV was reused rather than computed.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    num_preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
