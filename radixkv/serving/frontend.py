"""What `LLM` and `AsyncLLM` share: loading, the engine loop, and request preparation.

Everything here runs in the caller's thread and reads only immutable state (the model config,
the tokenizer), so any number of callers may use one front end at once. The engine itself is
touched only by its `EngineLoop` thread.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixkv.engine import Engine, EngineConfig, SamplingParams
from radixkv.engine.beam_search import BeamSearchParams
from radixkv.engine.engine_loop import EngineLoop
from radixkv.errors import InvalidRequestError
from radixkv.memory.kv_quant import parse_kv_cache_dtype, pool_bytes_per_token

if TYPE_CHECKING:
    from radixkv.model import LoadedModel

Prompt = str | Sequence[int]
Message = dict[str, str]

MAX_AUTO_TOKENS = 1 << 16  # cap of the automatic pool size (tokens)
AUTO_MEMORY_FRACTION = 0.25  # share of free memory the automatic pool may take


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device` (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


class Frontend:
    """Loads the model, builds the engine and starts its loop thread (see `LLM` for the args)."""

    def __init__(self, model: str | LoadedModel | None = None, *, dtype: str = "auto",
                 device: str = "cpu", max_total_tokens: int | None = None,
                 max_running_requests: int = 64, page_size: int = 1,
                 enable_prefix_cache: bool = True, schedule_policy: str = "lpm",
                 chunked_prefill_size: int = 512, seed: int = 0,
                 kv_store: str | None = None, kv_store_write_through: bool = False,
                 kv_cache_dtype: str = "auto", quantization: str | None = None) -> None:
        from radixkv.model import LoadedModel, load_model, validate_quantization

        validate_quantization(quantization)
        # Validate the options before the (slow) model load; the pool size is checked again
        # once known.
        EngineConfig(max_total_tokens=max_total_tokens or 1,
                     max_running_requests=max_running_requests, page_size=page_size,
                     enable_prefix_cache=enable_prefix_cache, schedule_policy=schedule_policy,
                     chunked_prefill_size=chunked_prefill_size, seed=seed, kv_store=kv_store,
                     kv_store_write_through=kv_store_write_through, kv_cache_dtype=kv_cache_dtype)
        # An already loaded model may be shared, e.g. by a cache-on and a cache-off LLM in an
        # A/B run; each front end still has its own pools, tree and loop. The model is loaded
        # and the engine built on the loop thread (see EngineLoop: one OpenMP pool).

        def build() -> Engine:
            lm = model if isinstance(model, LoadedModel) else load_model(
                model, dtype=dtype, device=device, quantization=quantization)
            # (no `self` in here: the loop thread keeps this function, and must not keep the
            # front end alive, whose finalizer stops the loop)
            tokens = max_total_tokens or Frontend._auto_pool_size(lm, kv_cache_dtype)
            return Engine(lm, EngineConfig(
                max_total_tokens=tokens, max_running_requests=max_running_requests,
                page_size=page_size, enable_prefix_cache=enable_prefix_cache,
                schedule_policy=schedule_policy, chunked_prefill_size=chunked_prefill_size,
                seed=seed, kv_store=kv_store, kv_store_write_through=kv_store_write_through,
                kv_cache_dtype=kv_cache_dtype))

        self.loop = EngineLoop(build)
        self.engine = self.loop.engine
        self.lm = self.engine.lm
        self.tokenizer = self.lm.tokenizer
        # The loop thread references the engine, not this object: once nobody holds the front
        # end, stop its loop, or the thread and the KV pool would live until interpreter exit.
        weakref.finalize(self, self.loop.shutdown, 0.0)
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-{id(self):x}"

    @staticmethod
    def _auto_pool_size(lm: LoadedModel, kv_cache_dtype: str) -> int:
        cfg = lm.config
        per_token = pool_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                       parse_kv_cache_dtype(kv_cache_dtype, lm.dtype))
        budget = int(free_memory_bytes(lm.device) * AUTO_MEMORY_FRACTION)
        # The cap bounds memory (MAX_AUTO_TOKENS tokens at the model dtype), so a quantized pool
        # holds proportionally more tokens under it too.
        cap = MAX_AUTO_TOKENS * pool_bytes_per_token(cfg.num_layers, cfg.num_kv_heads,
                                                   cfg.head_dim, lm.dtype) // per_token
        return max(1, min(budget // per_token, cap))

    # ---- facts callers may read -------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def pool_size(self) -> int:
        return self.engine.kv_pool.num_slots

    @property
    def model_name(self) -> str:
        """The model file's (or folder's) name without extension."""
        base = os.path.basename(os.path.normpath(self.lm.path))
        return base[:-5] if base.endswith(".gguf") else base

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation with the model's chat template, ready for a reply."""
        return self.lm.apply_chat_template(_as_conversation(messages), add_generation_prompt=True)

    # ---- request preparation (caller's thread) ----------------------------------------------
    def _new_id(self) -> str:
        return f"req-{self._prefix}-{next(self._ids)}"

    def _prepare(self, prompt: Prompt | None, messages: list[Message] | None,
                 params: SamplingParams | BeamSearchParams | None, namespace: Any
                 ) -> tuple[np.ndarray, str | None, SamplingParams | BeamSearchParams]:
        """Validated (prompt ids, prompt text, params); raises before anything is queued."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        params = SamplingParams() if params is None else params
        text = prompt if isinstance(prompt, str) else None
        ids = self.apply_chat_template(messages) if messages is not None else self._encode(prompt)
        return self.engine.validate(ids, params, namespace), text, params

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if isinstance(prompt, np.ndarray | torch.Tensor):
            return prompt.tolist()
        if isinstance(prompt, Sequence) and all(isinstance(t, int | np.integer) for t in prompt):
            return [int(t) for t in prompt]
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, "
                                  f"got {type(prompt).__name__}")

    # ---- introspection (runs on the loop thread) --------------------------------------------
    def cache_stats(self) -> dict[str, Any]:
        """Token hit rate, cached tokens, pool usage, evictions, preemptions and more."""
        return self.loop.call(Engine.stats).result()

    def check_no_leak(self) -> None:
        """Raise `AssertionError` unless, once idle, free slots + cached slots == pool size
        (and no lock or request row is held)."""
        self.loop.call(Engine.check_no_leak).result()

    def num_unfinished(self) -> int:
        """Requests queued or running."""
        return self.loop.num_unfinished()

    def shutdown(self) -> None:
        """Stop the engine loop (aborting what is left) and join its thread. Idempotent."""
        self.loop.shutdown()


def _as_conversation(messages: Any) -> list[Message]:
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        return messages
    raise InvalidRequestError("a conversation is a non-empty list of {'role': str, "
                              "'content': str} dicts")
