"""The engine: requests in, tokens out. Each `step()` is schedule -> run the model -> process."""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixkv.attention import check_kv_cache_support
from radixkv.engine.model_runner import ModelRunner
from radixkv.engine.request import Request
from radixkv.engine.sampler import Sampler
from radixkv.engine.sampling_params import SamplingParams
from radixkv.engine.scheduler import Batch, Scheduler
from radixkv.errors import InvalidRequestError
from radixkv.memory import NaiveCache, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.memory.kv_quant import parse_kv_cache_dtype
from radixkv.model import LoadedModel


@dataclass(slots=True)
class EngineConfig:
    max_total_tokens: int
    max_running_requests: int = 64
    page_size: int = 1
    enable_prefix_cache: bool = True
    schedule_policy: str = "lpm"
    chunked_prefill_size: int = 512
    seed: int = 0
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype), "int8" or "fp8_e4m3"


class Engine:
    """Continuous batching over the three memory levels for one loaded model."""

    def __init__(self, lm: LoadedModel, config: EngineConfig) -> None:
        cfg = lm.config
        self.lm = lm
        self.config = config
        self.max_context = cfg.max_position_embeddings
        check_kv_cache_support(parse_kv_cache_dtype(config.kv_cache_dtype, lm.dtype), lm.device)
        self.kv_pool = TokenToKVPool(config.max_total_tokens, cfg.num_layers, cfg.num_kv_heads,
                                     cfg.head_dim, dtype=lm.dtype, device=lm.device,
                                     kv_cache_dtype=config.kv_cache_dtype)
        self.req_pool = ReqToTokenPool(config.max_running_requests, self.max_context,
                                       device=lm.device)
        self.cache = (RadixCache(self.kv_pool, page_size=config.page_size)
                      if config.enable_prefix_cache
                      else NaiveCache(self.kv_pool, page_size=config.page_size))
        self.scheduler = Scheduler(self.cache, self.kv_pool, self.req_pool,
                                   config.schedule_policy, config.chunked_prefill_size,
                                   config.max_running_requests)
        self.runner = ModelRunner(lm, self.kv_pool, self.req_pool)
        self.sampler = Sampler(config.seed)
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                         "prefill_tokens": 0, "decode_tokens": 0, "steps": 0}

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_ids: Sequence[int] | np.ndarray, params: SamplingParams,
                 namespace: Any = None) -> np.ndarray:
        """Check a request without touching memory; returns the prompt as int32 ids."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be SamplingParams, got {params!r}")
        if not isinstance(namespace, Hashable):
            raise InvalidRequestError(f"namespace must be hashable, got {type(namespace)}")
        arr = np.asarray(prompt_ids)
        if arr.ndim != 1 or arr.size == 0:
            raise InvalidRequestError("prompt is empty" if arr.size == 0 else
                                      "prompt token ids must be a flat list")
        if arr.dtype.kind not in "iu":
            raise InvalidRequestError(f"prompt token ids must be integers, got {arr.dtype}")
        vocab = self.lm.config.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        total = arr.size + params.max_tokens
        if total > self.max_context:
            raise InvalidRequestError(
                f"prompt ({arr.size} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_context} tokens")
        if total > self.kv_pool.num_slots:
            raise InvalidRequestError(
                f"prompt + max_tokens = {total} tokens cannot fit the KV pool "
                f"({self.kv_pool.num_slots} slots); raise max_total_tokens")
        return arr.astype(np.int32)

    def add_request(self, prompt_ids: Sequence[int] | np.ndarray, params: SamplingParams,
                    namespace: Any = None, rid: str | None = None) -> Request:
        """Validate and queue a request; it joins the running batch at a coming step."""
        arr = self.validate(prompt_ids, params, namespace)
        rid = rid if rid is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        req = Request(rid, arr, params, namespace)
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed)
        self.requests[rid] = req
        self.scheduler.add(req)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(arr)
        return req

    def abort(self, rid: str) -> bool:
        """Stop a request now, releasing its memory; False if it is unknown or already done."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return False
        self._finish(req, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One engine iteration; returns the requests that got a token or finished in it."""
        batch = self.scheduler.schedule()  # 1. schedule
        if batch is None:
            return []
        logits = self.runner.forward(batch)  # 2. run the model
        return self._process(batch, logits)  # 3. process outputs

    def _process(self, batch: Batch, logits: torch.Tensor) -> list[Request]:
        self.counters["steps"] += 1
        sampled_items = [it for it in batch.items if it.sample]
        tokens = self.sampler(logits, [it.req.params for it in sampled_items],
                              [it.req.generator for it in sampled_items])
        next_token = {id(it.req): tok for it, tok in zip(sampled_items, tokens, strict=True)}
        touched = []
        now = time.perf_counter()
        for it in batch.items:
            req = it.req
            req.kv_len = it.end
            # A decode step that feeds a prompt token (a chunk stopped one short of the prompt's
            # end, or a cache hit covered all but the last token) is prefill work.
            if batch.is_decode and req.output_ids:
                self.counters["decode_tokens"] += 1
            else:
                self.counters["prefill_tokens"] += it.end - it.start
                req.prefill_tokens += it.end - it.start
            if not it.sample:
                self.scheduler.cache_prefix(req)  # chunk boundary: share the prefix early
                continue
            if not batch.is_decode:
                self.scheduler.cache_prefix(req)
            tok = next_token[id(req)]
            req.output_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
                self.counters["cached_tokens"] += req.prefix_hit
            reason = self._stop_reason(req, tok)
            if reason is not None:
                self._finish(req, reason)
            touched.append(req)
        return touched

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop_strings and self._stop_cut(self.decode_text(req.output_ids), p) >= 0:
            return "stop"
        if len(req.output_ids) >= p.max_tokens:
            return "length"
        return None

    @staticmethod
    def _stop_cut(text: str, p: SamplingParams) -> int:
        """Index of the earliest stop string in `text`, or -1."""
        hits = [i for i in (text.find(s) for s in p.stop_strings) if i >= 0]
        return min(hits) if hits else -1

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        req.finish_time = time.perf_counter()
        text = self.decode_text(req.output_ids)
        cut = self._stop_cut(text, req.params) if req.params.stop_strings else -1
        req.text = text[:cut] if cut >= 0 else text

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.lm.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pop_finished(self, rid: str) -> Request:
        """Forget a finished request (its output stays with the caller)."""
        return self.requests.pop(rid)

    def run_until_done(self, reqs: list[Request], progress: Any = None) -> None:
        """Step until every request in `reqs` has finished."""
        pending = {r.rid for r in reqs if not r.finished}
        while pending:
            for req in self.step():
                if req.finished and req.rid in pending:
                    pending.discard(req.rid)
                    if progress is not None:
                        progress.update(1)
            pending = {rid for rid in pending if not self.requests[rid].finished}
            if pending and not self.has_work():
                raise RuntimeError("engine went idle with requests still pending")

    # ---- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Prefix-cache and memory counters (tokens unless named otherwise)."""
        c = self.counters
        tree = self.cache.stats()
        pool = self.kv_pool
        return {
            "requests": c["requests"],
            "prompt_tokens": c["prompt_tokens"],
            "cached_tokens": c["cached_tokens"],
            "hit_rate": c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0,
            "prefill_tokens_computed": c["prefill_tokens"],
            "decode_tokens": c["decode_tokens"],
            "tree_tokens": self.cache.total_size(),
            "tree_nodes": tree.node_count,
            "evictable_tokens": self.cache.evictable_size(),
            "evicted_tokens": tree.evicted_tokens,
            "pool_size": pool.num_slots,
            "pool_free": pool.available_size(),
            "pool_used": pool.num_slots - pool.available_size(),
            "pool_usage": 1 - pool.available_size() / pool.num_slots,
            "kv_bytes_per_token": pool.bytes_per_token(),
            "preemptions": self.scheduler.num_preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "steps": c["steps"],
        }

    def check_no_leak(self) -> None:
        """When idle: free slots + cached slots == pool size, and the tree is consistent."""
        self.cache.check_invariants()
        if self.has_work():
            return
        free, cached = self.kv_pool.available_size(), self.cache.total_size()
        if free + cached != self.kv_pool.num_slots:
            raise AssertionError(f"KV slots leaked: free {free} + cached {cached} != "
                                 f"{self.kv_pool.num_slots}")
        if self.cache.protected_size():
            raise AssertionError("idle engine still holds locks on the tree")
        if self.req_pool.available_size() != self.req_pool.max_requests:
            raise AssertionError("idle engine still holds request rows")
