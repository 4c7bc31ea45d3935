"""The engine: requests in, tokens out. Each `step()` is schedule -> run the model -> process.

`Engine` is single-threaded: one thread owns it (see `EngineLoop` for serving many callers).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radixkv.attention import check_kv_cache_support
from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamState
from radixkv.engine.detokenizer import IncrementalDetokenizer
from radixkv.engine.forking import ForkingMixin, beam_output
from radixkv.engine.model_runner import ModelRunner
from radixkv.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from radixkv.engine.request import Request, Status
from radixkv.engine.sampler import Sampler, SampleResult, SampleRow
from radixkv.engine.sampling_params import SamplingParams
from radixkv.engine.schedule_policy import POLICIES
from radixkv.engine.scheduler import Batch, Scheduler
from radixkv.errors import ConfigError, EngineError, InvalidRequestError
from radixkv.memory import NaiveCache, RadixCache, ReqToTokenPool, TokenToKVPool
from radixkv.memory.kv_quant import parse_kv_cache_dtype
from radixkv.memory.tiers import DEFAULT_PAGE_TOKENS, KVTier, open_store, weights_fingerprint
from radixkv.model import LoadedModel

FETCH_POLL_S = 0.02  # an idle step waits this long for a KV-tier fetch to land


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True)
class EngineConfig:
    """Engine options, validated here once (`ConfigError`); see `LLM` for their meaning."""

    max_total_tokens: int
    max_running_requests: int = 64
    page_size: int = 1
    enable_prefix_cache: bool = True
    schedule_policy: str = "lpm"
    chunked_prefill_size: int = 512
    seed: int = 0
    kv_store: str | None = None  # "file:///dir" or "redis://host:port/db": a KV tier below
    kv_store_write_through: bool = False  # also store prompts' pages as soon as computed
    kv_tier_page_tokens: int | None = None  # None: the largest multiple of page_size <= 64
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype), "int8" or "fp8_e4m3"

    def __post_init__(self) -> None:
        for name in ("max_total_tokens", "max_running_requests", "page_size",
                     "chunked_prefill_size"):
            _positive_int(name, getattr(self, name))
        if self.schedule_policy not in POLICIES:
            raise ConfigError(f"unknown schedule_policy {self.schedule_policy!r}; use one of "
                              f"{POLICIES}")
        if not isinstance(self.enable_prefix_cache, bool):
            raise ConfigError(f"enable_prefix_cache must be a bool, "
                              f"got {self.enable_prefix_cache!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.kv_store is not None and not isinstance(self.kv_store, str):
            raise ConfigError(f"kv_store must be a URL string or None, got {self.kv_store!r}")
        if self.kv_tier_page_tokens is None:  # at most 64 tokens, a multiple of page_size
            p = self.page_size
            self.kv_tier_page_tokens = max(p, DEFAULT_PAGE_TOKENS // p * p)
        _positive_int("kv_tier_page_tokens", self.kv_tier_page_tokens)
        if self.kv_tier_page_tokens % self.page_size:
            raise ConfigError(f"kv_tier_page_tokens ({self.kv_tier_page_tokens}) must be a "
                              f"multiple of page_size ({self.page_size})")
        if self.kv_store is not None and not self.enable_prefix_cache:
            raise ConfigError("a kv_store needs the prefix cache (enable_prefix_cache=True)")
        parse_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # ConfigError naming choices


class Engine(ForkingMixin):
    """Continuous batching over the three memory levels for one loaded model.

    Parallel samples and beam search fork inside the engine (see `ForkingMixin`)."""

    def __init__(self, lm: LoadedModel, config: EngineConfig) -> None:
        cfg = lm.config
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.config = config
        self.max_context = cfg.max_position_embeddings
        check_kv_cache_support(parse_kv_cache_dtype(config.kv_cache_dtype, lm.dtype), lm.device)
        self.kv_pool = TokenToKVPool(config.max_total_tokens, cfg.num_layers, cfg.num_kv_heads,
                                     cfg.head_dim, dtype=lm.dtype, device=lm.device,
                                     kv_cache_dtype=config.kv_cache_dtype)
        self.req_pool = ReqToTokenPool(config.max_running_requests, self.max_context,
                                       device=lm.device)
        cache_cls = RadixCache if config.enable_prefix_cache else NaiveCache
        self.cache = cache_cls(self.kv_pool, page_size=config.page_size)
        self.tier = self._open_tier(lm, config)
        self._kernels = lm.kernel_info()  # which product kernels / weight formats are in use
        self.scheduler = Scheduler(self.cache, self.kv_pool, self.req_pool,
                                   config.schedule_policy, config.chunked_prefill_size,
                                   config.max_running_requests, tier=self.tier)
        self.runner = ModelRunner(lm, self.kv_pool, self.req_pool)
        self.sampler = Sampler(config.seed)
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "steps": 0,
                         "requests_finished": 0, "errors": 0}
        self.finish_reasons: dict[str, int] = {}
        # seconds, summed over steps. On CUDA the forward is asynchronous: its time lands in
        # "sample" (the step's one host sync); the split is exact on CPU.
        self.step_time = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "process": 0.0}

    def _open_tier(self, lm: LoadedModel, config: EngineConfig) -> KVTier | None:
        url = config.kv_store
        if url is None:
            return None
        if url == "host":
            if lm.device.type != "cuda":
                raise ConfigError("kv_store='host' is a pinned host-memory tier below a CUDA "
                                  "pool; on the CPU the pool already is host memory (use "
                                  "file:// or redis://)")
            raise ConfigError("kv_store='host' is not available in this build; use file:// or "
                              "redis://")
        store = open_store(url)
        return KVTier(store, self.kv_pool, weights_fingerprint(lm.model),
                      config.kv_tier_page_tokens, config.kv_store_write_through)

    def close(self) -> None:
        """Flush and close the KV tier (bounded time); the engine is unusable afterwards."""
        if self.tier is not None:
            self.tier.close()

    # ---- requests ---------------------------------------------------------------------------
    def validate(self, prompt_ids: Sequence[int] | np.ndarray,
                 params: SamplingParams | BeamSearchParams, namespace: Any = None) -> np.ndarray:
        """Check a request without touching any state; returns the prompt as int32 ids.

        Reads only immutable configuration, so any thread may call it. Forks need room: `n`
        samples and `beam_width` beams each take a request row (at most max_running_requests);
        n samples need prompt + n x max_tokens slots (each also copies < page_size tokens of
        the last prompt page), beam search beam_width x (prompt + max_tokens).
        """
        if isinstance(params, BeamSearchParams):
            arr = self.validate(prompt_ids, params.sampling_params(), namespace)
            w = params.beam_width
            if w > self.config.max_running_requests:
                raise InvalidRequestError(f"beam_width = {w} exceeds max_running_requests "
                                          f"({self.config.max_running_requests})")
            need = w * (arr.size + params.max_tokens)
            if need > self.kv_pool.num_slots:
                raise InvalidRequestError(
                    f"beam_width x (prompt + max_tokens) = {w} x ({arr.size} + "
                    f"{params.max_tokens}) = {need} tokens cannot fit the KV pool "
                    f"({self.kv_pool.num_slots} slots)")
            return arr
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
        extra = [t for t in (*params.stop_token_ids, *(params.logit_bias or ())) if t >= vocab]
        if extra:
            raise InvalidRequestError(f"token id {extra[0]} in stop_token_ids / logit_bias is "
                                      f"outside the vocabulary [0, {vocab})")
        total = arr.size + params.max_tokens
        if total > self.max_context:
            raise InvalidRequestError(
                f"prompt ({arr.size} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_context} tokens")
        if total > self.kv_pool.num_slots:
            raise InvalidRequestError(
                f"prompt + max_tokens = {total} tokens cannot fit the KV pool "
                f"({self.kv_pool.num_slots} slots); raise max_total_tokens")
        if params.n > self.config.max_running_requests:
            raise InvalidRequestError(f"n = {params.n} exceeds max_running_requests "
                                      f"({self.config.max_running_requests})")
        if params.n > 1:
            copy = self.config.page_size - 1 if self.config.enable_prefix_cache else arr.size
            need = arr.size + params.n * params.max_tokens + (params.n - 1) * copy
            if need > self.kv_pool.num_slots:
                raise InvalidRequestError(
                    f"n = {params.n} samples of prompt ({arr.size}) + max_tokens "
                    f"({params.max_tokens}) need {need} slots; the KV pool has "
                    f"{self.kv_pool.num_slots}")
        return arr.astype(np.int32)

    def add_request(self, prompt_ids: Sequence[int] | np.ndarray,
                    params: SamplingParams | BeamSearchParams, namespace: Any = None,
                    rid: str | None = None, prompt: str | None = None) -> Request:
        """Validate and queue a request; it joins the running batch at a coming step.

        `SamplingParams(n > 1)`: the prompt is prefilled once, then forked into n samples
        (`req.samples`); sample i draws from its own generator seeded with `seed + i` (when a
        seed is given), so it equals a separate request with seed `seed + i`.
        `BeamSearchParams`: a beam search (see `radixkv.engine.beam_search`).
        """
        arr = self.validate(prompt_ids, params, namespace)
        rid = rid if rid is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        beam = params if isinstance(params, BeamSearchParams) else None
        if beam is not None:
            params = beam.sampling_params()
        req = self._new_seq(rid, arr, params, namespace, prompt, params.seed)
        if beam is not None:
            eos = frozenset() if beam.ignore_eos else self.eos_ids
            req.beam = BeamState(beam.beam_width, beam.max_tokens, float(beam.length_penalty),
                                 eos)
            req.detokenizer = None
        elif params.n > 1:
            req.samples = [self._new_seq(f"{rid}/{i}", arr, params, namespace, prompt,
                                         None if params.seed is None else params.seed + i)
                           for i in range(params.n)]
            for i, child in enumerate(req.samples):
                child.parent, child.index = req, i
        self.requests[rid] = req
        self.scheduler.add(req)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(arr)
        return req

    def _new_seq(self, rid: str, arr: np.ndarray, params: SamplingParams, namespace: Any,
                 prompt: str | None, seed: int | None) -> Request:
        req = Request(rid, arr, params, namespace, prompt=prompt)
        req.detokenizer = IncrementalDetokenizer(
            self.tokenizer, params.stop_strings, skip_special_tokens=params.skip_special_tokens,
            include_stop_str_in_output=params.include_stop_str_in_output)
        if seed is not None:
            req.generator = torch.Generator().manual_seed(seed)
        return req

    def abort(self, rid: str) -> bool:
        """Stop a request now, releasing its memory (every sample / beam of it); False if it
        is unknown or already done."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return False
        self._finish_group(req, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One engine iteration; returns the requests that got a token, finished or failed.

        Returned are the submitted requests (a parent once for all its samples / beams).
        A forward that raises fails only that batch's requests (`finish_reason == "error"`,
        `req.error` an `EngineError`); their memory is released and the engine keeps serving.
        """
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()  # 1. schedule
        if batch is None:
            self.scheduler.wait_for_fetches(FETCH_POLL_S)  # only tier fetches are pending
            return []
        t1 = time.perf_counter()
        try:
            logits = self.runner.forward(batch)  # 2. run the model, then sample
            tf = time.perf_counter()
            seqs, per_item, src = self._sample_plan(batch)
            if len(src) != logits.shape[0]:  # a forking parent's row serves each of its samples
                logits = logits[torch.tensor(src, device=logits.device)]
            rows = [self._sample_row(s) for s in seqs]
            sample = self.sampler(logits, rows)
        except Exception as exc:  # noqa: BLE001 - any model failure becomes the batch's error
            return self._fail(batch, exc)
        t2 = time.perf_counter()
        if not batch.is_decode and tf > t1:  # prefill speed, for the tier's fetch-or-compute
            rate = batch.num_tokens / (tf - t1)
            prev = self.scheduler.prefill_tokens_per_s
            self.scheduler.prefill_tokens_per_s = rate if prev is None else 0.8 * prev + 0.2 * rate
        touched = self._process(batch, seqs, per_item, sample)  # 3. process outputs
        t3 = time.perf_counter()
        st = self.step_time
        st["schedule"] += t1 - t0
        st["forward"] += tf - t1
        st["sample"] += t2 - tf
        st["process"] += t3 - t2
        return touched

    @staticmethod
    def _sample_plan(batch: Batch) -> tuple[list[Request], list[tuple[str, int, int]], list[int]]:
        """The sequence each sampler row is for, how each sampling item takes its tokens
        ("one", "fork" or "beam", first row, rows) and the logits row of each sampler row."""
        seqs: list[Request] = []
        per_item: list[tuple[str, int, int]] = []
        src: list[int] = []
        for j, it in enumerate(it for it in batch.items if it.samples_next):
            req = it.req
            if req.is_beam:
                kind, group = "beam", [req]
            elif req.pending_fork:
                kind, group = "fork", req.samples
            else:
                kind, group = "one", [req]
            per_item.append((kind, len(seqs), len(group)))
            seqs.extend(group)
            src.extend([j] * len(group))
        return seqs, per_item, src

    def _sample_row(self, req: Request) -> SampleRow:
        p = req.params
        if req.is_beam:
            return SampleRow(p, None, req.prompt_ids, req.output_ids,
                             beam_k=req.group.beam.num_candidates)
        block: tuple[int, ...] = ()
        if len(req.output_ids) < p.min_tokens:
            block = (*(() if p.ignore_eos else self.eos_ids), *p.stop_token_ids)
        return SampleRow(p, req.generator, req.prompt_ids, req.output_ids, block)

    def _fail(self, batch: Batch, exc: Exception) -> list[Request]:
        failed = self.scheduler.fail(batch)
        err = EngineError(f"model forward failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        now = time.time()
        groups: dict[int, Request] = {}
        for req in failed:
            req.error = err
            req.finish_time = now
            groups.setdefault(id(req.group), req.group)
        for group in groups.values():
            self.counters["errors"] += 1
            if group.finished:  # failed itself (not forked yet)
                for s in group.samples or ():
                    s.status, s.finish_reason = Status.FINISHED, "error"
                self._count_finish("error")
            else:  # a sample / beam failed: the whole request does
                self._finish_group(group, "error")
            group.error = err
        return list(groups.values())

    def _process(self, batch: Batch, seqs: list[Request], per_item: list[tuple[str, int, int]],
                 sample: SampleResult) -> list[Request]:
        self.counters["steps"] += 1
        toks = sample.tokens
        item_tokens: list[int | list[int] | None] = [
            None if kind == "beam" else toks[a] if kind == "one" else toks[a:a + n]
            for kind, a, n in per_item]
        self.scheduler.postprocess(batch, item_tokens)
        now = time.time()
        touched: dict[int, Request] = {}
        beams: dict[int, list[int]] = {}
        for r, req in enumerate(seqs):
            group = req.group
            touched.setdefault(id(group), group)
            self._first_token(req, now)
            if req.is_beam:
                beams.setdefault(id(group), []).append(r)
                continue
            tok, lp = toks[r], sample.logprobs[r]
            if lp is not None and req.logprobs is not None:
                req.logprobs.append(lp)
                req.cumulative_logprob += lp[tok]
            # before min_tokens, stop strings do not count (vLLM): the text keeps growing
            req.detokenizer.add(tok, check_stop=len(req.output_ids) >= req.params.min_tokens)
            reason = self._stop_reason(req, tok)
            if reason is not None:
                self._finish(req, reason)
        for rs in beams.values():
            self._beam_step(seqs[rs[0]].group, [seqs[r] for r in rs],
                            [sample.candidates[r] for r in rs])
        return list(touched.values())

    def _first_token(self, req: Request, now: float) -> None:
        group = req.group
        if group.first_token_time is None:
            group.first_token_time = now
            self.counters["cached_tokens"] += max(group.prefix_hit, 0)
        if req.first_token_time is None:
            req.first_token_time = now

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return "stop"
            if tok in self.eos_ids and not p.ignore_eos:
                return "stop"
            if req.detokenizer.stop_hit is not None:
                req.stop_reason = req.detokenizer.stop_hit
                return "stop"
        if len(req.output_ids) >= p.max_tokens:
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        """A sequence ends on its own (stop / length); its request ends with its last sample."""
        self.scheduler.finish(req, reason)
        req.finish_time = time.time()
        req.detokenizer.finish()
        group = req.parent
        if group is None:
            self._count_finish(reason)
        elif all(s.finished for s in group.samples):
            group.status, group.finish_reason = Status.FINISHED, reason
            group.finish_time = req.finish_time
            self._count_finish(reason)

    def _count_finish(self, reason: str) -> None:
        self.counters["requests_finished"] += 1
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pop_finished(self, rid: str) -> Request:
        """Forget a finished request (its output stays with the caller)."""
        return self.requests.pop(rid)

    def run_until_done(self, reqs: list[Request], progress: Any = None) -> None:
        """Step until every request in `reqs` has finished (single-threaded use)."""
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

    # ---- outputs ----------------------------------------------------------------------------
    @staticmethod
    def output(req: Request) -> RequestOutput | BeamSearchOutput:
        """A snapshot of `req` as a `RequestOutput` (cumulative text and tokens, one
        `CompletionOutput` per sample), or a `BeamSearchOutput` for a beam search."""
        if req.beam is not None:
            return beam_output(req)
        seqs = req.samples if req.samples is not None else [req]
        return RequestOutput(
            request_id=req.rid, prompt=req.prompt, prompt_token_ids=req.prompt_ids.tolist(),
            outputs=[_completion(s, i) for i, s in enumerate(seqs)], finished=req.finished,
            num_cached_tokens=max(req.prefix_hit, 0),
            metrics=RequestMetrics(req.arrival, req.first_token_time, req.finish_time),
            num_preemptions=req.preemptions + sum(s.preemptions for s in req.samples or ()))

    # ---- introspection ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Prefix-cache and memory counters (tokens unless named otherwise)."""
        c = self.counters
        tree = self.cache.stats()
        pool = self.kv_pool
        st = self.step_time
        busy = sum(st.values())
        return {
            "requests": c["requests"],
            "requests_finished": c["requests_finished"],
            "finish_reasons": dict(self.finish_reasons),
            "errors": c["errors"],
            "prompt_tokens": c["prompt_tokens"],
            "cached_tokens": c["cached_tokens"],
            "hit_rate": c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else 0.0,
            "prefill_tokens_computed": self.scheduler.prefill_tokens,
            "decode_tokens": self.scheduler.decode_tokens,
            "tree_tokens": self.cache.total_size(),
            "tree_tokens_by_namespace": self._tokens_by_namespace(),
            "tree_nodes": tree.node_count,
            "evictable_tokens": self.cache.evictable_size(),
            "evicted_tokens": tree.evicted_tokens,
            "prefix_query_tokens": tree.query_tokens,
            "prefix_hit_tokens": tree.hit_tokens,
            "pool_size": pool.num_slots,
            "pool_free": pool.available_size(),
            "pool_used": pool.num_slots - pool.available_size(),
            "pool_usage": 1 - pool.available_size() / pool.num_slots,
            "kv_bytes_per_token": pool.bytes_per_token(),
            "preemptions": self.scheduler.num_preemptions,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "steps": c["steps"],
            # share of step time outside the model forward (scheduler, sampler, detokenizer)
            "host_time_share": (busy - st["forward"]) / busy if busy else 0.0,
            "step_time_s": dict(st),
            **(self.tier.snapshot() if self.tier is not None else {}),
            "kernels": self._kernels,
        }

    def _tokens_by_namespace(self) -> dict[Any, int]:
        """Tokens held by the tree under each namespace's root (one walk of the tree)."""
        out: dict[Any, int] = {}
        for node, _ in self.cache.walk():
            ns = node.namespace
            out[ns] = out.get(ns, 0) + len(node)
        return out

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


def _completion(req: Request, index: int) -> CompletionOutput:
    done = req.finished
    # While running, hold back a tail that may still become a stop string (cut later), so the
    # cumulative text only ever grows.
    text = req.text if done else req.detokenizer.safe_text()
    return CompletionOutput(
        index=index, text=text, token_ids=list(req.output_ids),
        finish_reason=req.finish_reason if done else None,
        stop_reason=req.stop_reason if done else None,
        logprobs=list(req.logprobs) if req.logprobs is not None else None,
        cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None)
