"""OpenAI API request models, their validation into `SamplingParams`, and the response shapes.

Requests are parsed with pydantic into `ChatCompletionRequest` / `CompletionRequest`. Anything a
client may send is in one of three groups: fields radixkv implements (OpenAI's and the vLLM-style
extensions `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, `cache_salt`, ...),
fields that do not change the output (`user`, `metadata`, ...; accepted), and everything else
(`tools`, `response_format`, unknown names): a 400 that names them. Errors leave as `APIError`,
rendered in OpenAI's `{"error": {"message", "type", "param", "code"}}` form.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from radixkv.engine.sampling_params import SamplingParams
from radixkv.errors import InvalidRequestError

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20


# ---- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's JSON form with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ---- request models ----------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class _SamplingRequest(_Model):
    """Fields shared by both endpoints; None means "not given" (clients send explicit nulls)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (the openai client's extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    cache_salt: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# Fields that do not change what is generated: accepted and ignored. sglang-router adds
# `separate_reasoning` / `stream_reasoning` (SGLang's reasoning-parser switches) to every request
# it forwards; with no reasoning parser here they change nothing.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier",
                      "prompt_cache_key", "prompt_cache_retention", "separate_reasoning",
                      "stream_reasoning"})


def _unset(value: Any) -> bool:
    """An explicit null, false or empty list / object: a field not really used."""
    return value is None or value is False or (isinstance(value, list | dict) and not value)


def parse_request(kind: type[_SamplingRequest], body: Any) -> _SamplingRequest:
    """Validate a JSON body; unknown or unimplemented fields -> 400 naming them."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = kind.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise bad_request(f"{loc or 'body'}: {err.get('msg', 'invalid value')}",
                          param=str(err["loc"][0]) if err.get("loc") else None) from None
    unsupported = sorted(k for k, v in (req.model_extra or {}).items()
                         if k not in _IGNORED and not _unset(v))
    if unsupported:
        raise bad_request(f"unsupported parameter(s): {', '.join(unsupported)} (radixkv does "
                          f"not implement them)", param=unsupported[0],
                          code="unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise bad_request("echo is not supported", param="echo",
                              code="unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix",
                              code="unsupported_parameter")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise bad_request("best_of other than n is not supported", param="best_of",
                              code="unsupported_parameter")
    for i, msg in enumerate(getattr(req, "messages", None) or []):
        if msg.model_extra and not all(_unset(v) for v in msg.model_extra.values()):
            names = ", ".join(sorted(msg.model_extra))
            raise bad_request(f"messages[{i}]: unsupported field(s) {names}",
                              param=f"messages[{i}]", code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true",
                          param="stream_options")
    return req


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as plain {"role", "content"} dicts for the chat template (text parts joined)."""
    if not req.messages:
        raise bad_request("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role {m.role!r} is not supported (system, "
                              f"developer, user or assistant)", param="messages")
        if isinstance(m.content, list):
            kinds = {p.type for p in m.content} - {"text"}
            if kinds:
                raise bad_request(f"messages[{i}]: content parts of type "
                                  f"{', '.join(sorted(kinds))} are not supported (text only)",
                                  param="messages", code="unsupported_parameter")
            text = "".join(p.text or "" for p in m.content)
        else:
            text = m.content or ""
        out.append({"role": role, "content": text})
    return out


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompt(s) of a completion request: one string or token-id list per prompt."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif p and all(isinstance(t, int) for t in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts or any(len(x) == 0 for x in prompts):
        raise bad_request("prompt must not be empty", param="prompt")
    return prompts


# ---- sampling params ---------------------------------------------------------------------------
def requested_n(req: _SamplingRequest) -> int:
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {n}", param="n")
    return n


def num_logprobs(req: _SamplingRequest) -> int | None:
    """Top-k alternatives per token to return, or None for no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        param = "top_logprobs"
    else:
        k, param = req.logprobs, "logprobs"
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_request(f"{param} must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param=param)
    return k


def max_new_tokens(req: _SamplingRequest, prompt_len: int, limit: int) -> int:
    """The request's max_tokens; by default what is left of `limit` (chat) or 16 (completions).

    `limit` is the most tokens a request may hold: min(model context, KV pool size).
    """
    given = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) else None
    given = given if given is not None else req.max_tokens
    param = "max_completion_tokens" if isinstance(req, ChatCompletionRequest) and \
        req.max_completion_tokens is not None else "max_tokens"
    if given is not None and given < 1:
        raise bad_request(f"{param} must be >= 1, got {given}", param=param)
    if prompt_len >= limit:
        raise bad_request(f"the prompt has {prompt_len} tokens; this server holds at most "
                          f"{limit} tokens per request (prompt + output)",
                          param="messages" if isinstance(req, ChatCompletionRequest)
                          else "prompt", code="context_length_exceeded")
    if given is None:
        return limit - prompt_len if isinstance(req, ChatCompletionRequest) else \
            min(16, limit - prompt_len)
    if prompt_len + given > limit:
        raise bad_request(f"prompt ({prompt_len} tokens) + {param} ({given}) = "
                          f"{prompt_len + given} tokens is more than this server holds per "
                          f"request ({limit}: the model context or the KV pool)", param=param,
                          code="context_length_exceeded")
    return given


def to_sampling_params(req: _SamplingRequest, max_tokens: int, n: int,
                       logprobs: int | None) -> SamplingParams:
    """Map a request onto SamplingParams; invalid values -> 400."""
    kw: dict[str, Any] = dict(max_tokens=max_tokens, n=n)  # n samples fork after one prefill
    for name in ("temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                 "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if req.logit_bias:
        try:
            kw["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids", param="logit_bias") from None
        if any(not -100 <= v <= 100 for v in kw["logit_bias"].values()):
            raise bad_request("logit_bias values must be in [-100, 100]", param="logit_bias")
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as exc:
        raise bad_request(str(exc)) from None
    except TypeError as exc:  # a field this build's SamplingParams lacks
        raise bad_request(f"a sampling parameter is not supported by this radixkv build: "
                          f"{exc}", code="unsupported_parameter") from None


# ---- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens is always there."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: an impossible token gets this instead


def _finite(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR


def _ranked(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return [(t, _finite(lp)) for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:k]]


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, float]], k: int,
                  decode: Callable[[int], str]) -> dict[str, Any]:
    """Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for tok, entry in zip(token_ids, entries, strict=False):
        text = decode(tok)
        content.append({
            "token": text, "logprob": _finite(entry.get(tok, float("-inf"))),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": decode(t), "logprob": lp,
                              "bytes": list(decode(t).encode("utf-8"))}
                             for t, lp in _ranked(entry, k)]})
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, float]], k: int,
                        decode: Callable[[int], str], offset: int = 0) -> dict[str, Any]:
    """Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=False):
        text = decode(tok)
        tokens.append(text)
        lps.append(_finite(entry.get(tok, float("-inf"))))
        top: dict[str, float] = {}
        for t, lp in _ranked(entry, k):
            top.setdefault(decode(t), lp)  # two ids may decode alike: keep the likelier
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


@dataclass(slots=True)
class ChoiceStream:
    """What of one choice has been streamed: its text and how many tokens' logprobs."""

    sent_text: str = ""
    sent_tokens: int = 0
    text_offset: int = 0
    done: bool = False
    stops: tuple[str, ...] = field(default_factory=tuple)

    def next_text(self, text: str, finished: bool) -> str:
        """The new text to send: all of it once finished, else holding back an incomplete
        character or the beginning of a stop string that may still form (and be cut)."""
        if not finished:
            text = text.rstrip("\ufffd")
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        if not text.startswith(self.sent_text) or len(text) <= len(self.sent_text):
            return ""
        delta = text[len(self.sent_text):]
        self.sent_text = text
        return delta
