"""Prometheus metrics of the OpenAI server (`GET /metrics`, text format via prometheus-client).

Two sources. The engine's own cumulative counters (prefix-cache query and hit tokens, evicted
tokens, preemptions) and its gauges (running / waiting requests, KV pool use) are read from
`cache_stats()` at scrape time by a collector, so they are exact and monotonic: the hit rate over
any window is `rate(hits) / rate(queries)`, not a value overwritten per batch. Per-request
figures (tokens, finish reasons, errors, latency histograms) are counted by the server as
requests end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "radixkv"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                    80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# cache_stats() key -> (metric name, help); counters are cumulative in the engine.
_ENGINE_COUNTERS = {
    "prompt_tokens": ("prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix "
                      "cache"),
    "cached_tokens": ("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache"),
    "prefill_tokens_computed": ("prefill_computed_tokens", "Prompt tokens the model computed"),
    "evicted_tokens": ("evicted_tokens", "KV tokens evicted from the prefix cache"),
    "preemptions": ("preemptions", "Requests preempted for lack of KV memory"),
    "tier_hit_tokens": ("kv_tier_hits_tokens", "Prompt tokens reused from the KV tier (store)"),
    "tier_bytes_read": ("kv_tier_read_bytes", "Bytes fetched from the KV tier"),
    "tier_bytes_written": ("kv_tier_written_bytes", "Bytes written to the KV tier"),
    "tier_written_pages": ("kv_tier_written_pages", "Pages written to the KV tier"),
    "tier_dropped_writes": ("kv_tier_dropped_pages", "Pages not written (store down or busy)"),
}
_ENGINE_GAUGES = {
    "running": ("num_requests_running", "Requests in the running batch"),
    "waiting": ("num_requests_waiting", "Requests queued in the engine"),
    "pool_usage": ("kv_pool_usage_ratio", "Share of the KV pool's slots in use (0..1)"),
    "pool_size": ("kv_pool_size_tokens", "KV pool size in token slots"),
    "pool_free": ("kv_pool_free_tokens", "Free KV token slots"),
    "tree_tokens": ("kv_cached_tokens", "KV token slots held by the prefix cache"),
}


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]],
                 extra: Callable[[], dict[str, float]]) -> None:
        self._stats, self._extra = stats, extra

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=float(stats[key]))
        for key, (name, doc) in _ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=float(stats[key]))
        errors = stats.get("tier_errors")
        if errors is not None:
            fam = CounterMetricFamily(f"{PREFIX}_kv_tier_errors", "KV store errors by kind "
                                      "(connection, timeout, full, corrupt_*)", labels=["kind"])
            for kind, n in sorted(errors.items()):
                fam.add_metric([kind], float(n))
            yield fam
        buckets = stats.get("tier_fetch_latency_buckets")
        if buckets is not None:  # [(upper bound, count in that bucket)] -> cumulative
            total, cum = 0, []
            for bound, n in buckets:
                total += n
                cum.append(("+Inf" if bound == float("inf") else str(bound), float(total)))
            yield HistogramMetricFamily(f"{PREFIX}_kv_tier_fetch_seconds", "KV tier fetch "
                                        "latency", buckets=cum,
                                        sum_value=float(stats.get("tier_fetch_seconds", 0.0)))
        for name, value in self._extra().items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", name.replace("_", " "), value=value)


class ServerMetrics:
    """The server's registry: engine figures read at scrape time plus per-request ones."""

    def __init__(self, stats: Callable[[], dict[str, Any]],
                 extra: Callable[[], dict[str, float]] = dict) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, extra))
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of served "
                                     "requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens",
                                         registry=r)
        self.finished = Counter(f"{PREFIX}_request_finished", "Finished choices by finish "
                                "reason", ["finish_reason"], registry=r)
        self.errors = Counter(f"{PREFIX}_request_errors", "Requests answered with an error, by "
                              "error type and HTTP status", ["type", "status"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Time per output token "
                              "after the first", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "End-to-end request "
                             "latency", buckets=_LATENCY_BUCKETS, registry=r)

    def observe_request(self, prompt_tokens: int, completion_tokens: list[int],
                        finish_reasons: list[str | None], arrival: float,
                        first_token: float | None, finished: float | None) -> None:
        """Count one finished (or aborted) request; times are time.time() stamps."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(sum(completion_tokens))
        for reason in finish_reasons:
            self.finished.labels(finish_reason=reason or "abort").inc()
        if first_token is not None:
            self.ttft.observe(max(first_token - arrival, 0.0))
            most = max(completion_tokens, default=0)
            if finished is not None and most > 1:
                self.tpot.observe(max(finished - first_token, 0.0) / (most - 1))
        if finished is not None:
            self.e2e.observe(max(finished - arrival, 0.0))

    def observe_error(self, type_: str, status: int) -> None:
        self.errors.labels(type=type_, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
