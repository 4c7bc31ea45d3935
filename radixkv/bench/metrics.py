"""Figures of one run, as plain JSON-ready dicts: hit rates beside their optima, token
conservation, leaks, throughput, time to first token, KV memory, and memory efficiency.

Token conservation: `prefill_counter` counts every token that went through an extend step (the
engine's own counter), independently of the per-request hits taken at admission. A prompt whose
last chunk ends one token short has that token fed by a decode step, which no prefill counter
sees; the run log notes those (`prompt_decoded`) and they are added back. Without preemption,
hit + computed == prompt tokens must then hold exactly; a preempted request also recomputes what
it had (`recomputed_tokens`, taken out before the check).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from radixkv.bench.optimal import BeladyResult, InfiniteBound, LcpIndex, belady, infinite_bound
from radixkv.bench.runlog import RunLog


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def hit_metrics(log: RunLog, prefill_counter: int, *, with_belady: bool = True,
                index: LcpIndex | None = None) -> dict[str, Any]:
    """Achieved hits, both optima on this run's sequences, conservation and consistency."""
    prompt_tokens = int(log.prompt_lens.sum())
    hit = int(log.hits.sum())
    inf: InfiniteBound = infinite_bound(log.sequences, log.prompt_lens)
    own = log.prompt_lens - log.hits  # what each request had to compute at first admission
    preempted = log.preemptions > 0
    # The engine counts a prompt token fed by a decode step as prefill work, so its counters
    # already hold every prompt token computed (prompt_decoded is reported, not added).
    per_req = log.prefill_tokens  # prompt tokens each request computed
    computed = int(prefill_counter)
    recomputed = int((per_req[preempted] - own[preempted]).sum())
    out: dict[str, Any] = {
        "requests": len(log.sequences),
        "prompt_tokens": prompt_tokens,
        "hit_tokens": hit,
        "hit_rate": hit / prompt_tokens if prompt_tokens else 0.0,
        "infinite_hit_tokens": inf.hit_tokens,
        "infinite_hit_rate": inf.hit_rate,
        "unique_prefix_tokens": inf.unique_prefix_tokens,
        "prefill_tokens": computed,  # every prompt token computed, recomputes included
        "engine_prefill_counter": int(prefill_counter),
        "prompt_tokens_by_decode": int(log.prompt_decoded.sum()),
        "recomputed_tokens": recomputed,
        "computed_tokens": computed - recomputed,
        "preemptions": int(log.preemptions.sum()),
        "conserved": hit + computed - recomputed == prompt_tokens,
        "per_request_consistent": bool(
            (per_req[~preempted] == own[~preempted]).all()
            and int(log.prefill_tokens.sum()) == int(prefill_counter)
            and (per_req[preempted] >= own[preempted]).all()),
        "steps": log.num_steps,
        "capacity": log.capacity,
    }
    if with_belady:
        b: BeladyResult = belady(log, index)
        out.update(belady_hit_tokens=b.hit_tokens, belady_hit_rate=b.hit_rate,
                   belady_forced_tokens=b.forced_tokens, belady_reach_tokens=b.reach_tokens,
                   achieved_within_reach=b.achieved_within_reach)
    return out


def kv_metrics(log: RunLog, bytes_per_token: int) -> dict[str, Any]:
    """Pool slots in use (cache included) and held by running requests, peak and mean."""
    active = log.pool_used - log.evictable
    return {
        "kv_bytes_per_token": bytes_per_token,
        "kv_peak_tokens": int(log.pool_used.max()) if len(log.pool_used) else 0,
        "kv_mean_tokens": float(log.pool_used.mean()) if len(log.pool_used) else 0.0,
        "kv_active_peak_tokens": int(active.max()) if len(active) else 0,
        "kv_peak_bytes": int(log.pool_used.max() * bytes_per_token) if len(log.pool_used) else 0,
        "kv_mean_bytes": float(log.pool_used.mean() * bytes_per_token)
        if len(log.pool_used) else 0.0,
    }


def timing_metrics(arrival: np.ndarray, first_token: np.ndarray, finish: np.ndarray,
                   output_tokens: int, wall_s: float) -> dict[str, Any]:
    ttft_ms = (first_token - arrival) * 1e3
    return {
        "wall_s": wall_s,
        "req_per_s": len(arrival) / wall_s if wall_s > 0 else None,
        "out_tok_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "output_tokens": int(output_tokens),
        "ttft_p50_ms": _pct(ttft_ms, 50),
        "ttft_p99_ms": _pct(ttft_ms, 99),
        "ttft_ms": [round(float(t), 3) for t in np.sort(ttft_ms)],
        "latency_p50_ms": _pct((finish - arrival) * 1e3, 50),
    }


def memory_efficiency(log: RunLog, bytes_per_token: int) -> dict[str, Any]:
    """The vLLM paper's point on this trace, over the steps with running requests.

    - reserved: a contiguous cache pre-allocating prompt + max_tokens per running request;
    - used: KV of the tokens the running requests actually hold (sum of their lengths);
    - radixkv: pool slots the running requests hold in radixkv (per-token slots, shared prefix
      slots counted once; the evictable cache is not counted, it is free on demand).
    """
    busy = log.reserved > 0
    reserved = log.reserved[busy].astype(np.float64)
    used = log.running_kv[busy].astype(np.float64)
    held = (log.pool_used - log.evictable)[busy].astype(np.float64)
    if not busy.any():
        return {}
    return {
        "kv_bytes_per_token": bytes_per_token,
        "reserved_mean_tokens": float(reserved.mean()),
        "used_mean_tokens": float(used.mean()),
        "radixkv_mean_tokens": float(held.mean()),
        "reserved_peak_tokens": int(reserved.max()),
        "used_peak_tokens": int(used.max()),
        "radixkv_peak_tokens": int(held.max()),
        "used_of_reserved": float(used.sum() / reserved.sum()),
        "radixkv_of_used": float(held.sum() / used.sum()) if used.sum() else None,
    }
