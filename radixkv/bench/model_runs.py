"""Model-level runs: the same traces through the real `Engine` on a model, and through Hugging Face
transformers' batched `generate` as an outside baseline.

Every system generates exactly len(answer) tokens per request, greedy, EOS ignored, so all do the
same work; a child request (next chat turn, sub-branch) is built from its parent's real output.
A request arrives at the start of the run, or when its parent finishes; time to first token is
measured from that arrival for every system alike.

The model is loaded once; each radixkv system gets a fresh `Engine` (its own KV pool, tree and
scheduler) over the same weights, warmed up on two short prompts and reset before the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radixkv.bench.memory_runs import System
from radixkv.bench.runlog import RunLog, drive
from radixkv.bench.workloads import TOKEN_HI, TOKEN_LO, Trace
from radixkv.engine import Engine, EngineConfig, Request, SamplingParams

HF_SYSTEM = "transformers generate"


def make_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama (GQA 4/2 heads) with the default model's tokenizer to `folder`
    (a Hugging Face folder LLM(folder) loads). Seconds to build; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixkv.model import load_tokenizer

    tok = load_tokenizer(None)
    folder = Path(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class EngineRunAdapter:
    """`EngineAdapter` over a real `Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, j: int, prompt: np.ndarray, max_tokens: int) -> Request:
        return self.engine.add_request(
            prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
            rid=f"bench-{j}")

    def step(self) -> None:
        self.engine.step()

    def running(self) -> list[Request]:
        return list(self.engine.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def pool_state(self) -> tuple[int, int]:
        pool = self.engine.kv_pool
        return pool.num_slots - pool.available_size(), self.engine.cache.evictable_size()


@dataclass
class ModelRun:
    system: str
    log: RunLog
    prefill_counter: int  # the engine's prefill token counter over the run (recompute included)
    evicted_tokens: int
    kv_bytes_per_token: int
    leak_free: bool


@dataclass
class HFRun:
    system: str
    prompts: list[np.ndarray]
    outputs: list[np.ndarray]
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    wall_s: float


class ModelBench:
    """One loaded model serving every model-level system."""

    def __init__(self, model: str | None, dtype: str = "float32") -> None:
        from radixkv.model import load_model

        self.model_arg = model
        self.dtype = dtype
        self.lm = load_model(model, dtype=dtype)  # engines with their own pools are built per run
        self.vocab = self.lm.config.vocab_size
        self._hf: Any = None

    @property
    def model_name(self) -> str:
        return os.path.basename(self.lm.path.rstrip("/")) or self.lm.path

    def check_trace(self, trace: Trace) -> None:
        if TOKEN_HI > self.vocab:
            raise ValueError(f"workload token ids reach {TOKEN_HI} but the model's vocabulary "
                             f"has {self.vocab} (ids from {TOKEN_LO})")

    def run_engine(self, trace: Trace, system: System, capacity: int, *, max_running: int,
                   window: int, chunk: int,
                   progress: Callable[[int], Any] | None = None) -> ModelRun:
        self.check_trace(trace)
        engine = Engine(self.lm, EngineConfig(
            max_total_tokens=capacity, max_running_requests=max_running, page_size=1,
            enable_prefix_cache=system.prefix_cache, schedule_policy=system.policy,
            chunked_prefill_size=chunk))
        self._warm_up(engine)
        adapter = EngineRunAdapter(engine)
        before = engine.scheduler.prefill_tokens
        evicted_before = engine.cache.stats().evicted_tokens
        log = drive(trace, adapter, capacity, window, progress)
        prefill = engine.scheduler.prefill_tokens - before
        evicted = engine.cache.stats().evicted_tokens - evicted_before
        try:
            engine.check_no_leak()
            leak_free = True
        except AssertionError:
            leak_free = False
        run = ModelRun(system.name, log, prefill, evicted, engine.kv_pool.bytes_per_token(),
                       leak_free)
        del engine, adapter  # frees the pool before the next system builds its own
        return run

    def _warm_up(self, engine: Engine) -> None:
        """First-call costs (allocator, kernels) out of the timed run; the tree is emptied."""
        rng = np.random.default_rng(12345)
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        reqs = [engine.add_request(rng.integers(TOKEN_LO, TOKEN_HI, 24), params)
                for _ in range(2)]
        engine.run_until_done(reqs)
        for r in reqs:
            engine.pop_finished(r.rid)
        engine.cache.reset()

    # ---- Hugging Face transformers ------------------------------------------------------------
    def hf_model(self) -> Any:
        if self._hf is None:
            from transformers import AutoModelForCausalLM

            path = self.lm.path
            torch_dtype = self.lm.dtype
            if os.path.isdir(path):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch_dtype)
            self._hf = model.eval()
        return self._hf

    def run_hf(self, trace: Trace, batch_size: int,
               progress: Callable[[int], Any] | None = None) -> HFRun:
        """Left-padded batches of up to `batch_size` ready requests, in trace order."""
        from transformers import LogitsProcessor, LogitsProcessorList

        class FirstStep(LogitsProcessor):  # the first call comes right after the prefill forward
            def __init__(self) -> None:
                self.t: float | None = None

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if self.t is None:
                    self.t = time.perf_counter()
                return scores

        self.check_trace(trace)
        model = self.hf_model()
        tok = self.lm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self._hf_warm_up(model, pad)
        n = len(trace)
        outputs: list[np.ndarray | None] = [None] * n
        prompts: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        arrival, first, finish = np.zeros(n), np.zeros(n), np.zeros(n)
        start = time.perf_counter()
        arrival[:] = start
        done = [False] * n
        while not all(done):
            ready = [i for i in range(n) if not done[i] and outputs[i] is None and (
                trace.requests[i].parent < 0 or done[trace.requests[i].parent])]
            chunk = ready[:batch_size]
            batch = [trace.prompt(i, outputs) for i in chunk]
            width = max(len(p) for p in batch)
            new = max(trace.max_tokens(i) for i in chunk)
            ids = torch.tensor(np.stack([np.r_[np.full(width - len(p), pad), p] for p in batch]),
                               dtype=torch.long)
            mask = torch.tensor(np.stack([np.r_[np.zeros(width - len(p)), np.ones(len(p))]
                                          for p in batch]), dtype=torch.long)
            probe = FirstStep()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                                     logits_processor=LogitsProcessorList([probe]))
            end = time.perf_counter()
            for b, i in enumerate(chunk):
                prompts[i] = batch[b]
                outputs[i] = out[b, width:width + trace.max_tokens(i)].numpy().astype(np.int32)
                first[i] = probe.t if probe.t is not None else end
                finish[i] = end
                done[i] = True
                for c, r in enumerate(trace.requests):
                    if r.parent == i:
                        arrival[c] = end
            if progress is not None:
                progress(len(chunk))
        wall = time.perf_counter() - start
        return HFRun(HF_SYSTEM, prompts, [o for o in outputs if o is not None], arrival, first,
                     finish, wall)

    @staticmethod
    def _hf_warm_up(model: Any, pad: int) -> None:
        ids = torch.full((2, 8), TOKEN_LO, dtype=torch.long)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=2, min_new_tokens=2, pad_token_id=pad)
