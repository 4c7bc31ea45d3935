"""OpenAI response bodies from `RequestOutput`s: whole responses and server-sent event streams.

A stream is `data: {chunk}` lines: for chat the first chunk per choice carries the role, then
content deltas (text is held back while it may still turn into a stop string or ends in an
incomplete character, so nothing sent is ever taken back), then a chunk with the finish reason,
an optional usage chunk (`stream_options.include_usage`, `choices: []`), and `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from radixkv import errors
from radixkv.serving import openai_protocol as proto

log = logging.getLogger("radixkv.serve")
T = TypeVar("T")


@dataclass(slots=True)
class StreamSpec:
    """What a response needs besides the outputs: ids, the model name, the choice layout."""

    rid: str
    created: int
    model: str
    chat: bool
    n: int
    logprobs: int | None
    stops: tuple[str, ...]
    include_usage: bool
    decode: Callable[[int], str]

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None,
                  offset: int = 0) -> dict[str, Any] | None:
        if self.logprobs is None or entries is None:
            return None
        if self.chat:
            return proto.chat_logprobs(token_ids, entries, self.logprobs, self.decode)
        return proto.completion_logprobs(token_ids, entries, self.logprobs, self.decode, offset)

    def usage(self, outs: list[Any]) -> dict[str, Any]:
        return proto.usage(sum(len(o.prompt_token_ids) for o in outs),
                           sum(len(c.token_ids) for o in outs for c in o.outputs),
                           sum(o.num_cached_tokens for o in outs))

    def full_response(self, outs: list[Any]) -> dict[str, Any]:
        """The non-streaming body: one choice per (prompt, completion)."""
        choices = []
        for pi, out in enumerate(outs):
            for c in out.outputs:
                entry: dict[str, Any] = {"index": pi * self.n + c.index}
                if self.chat:
                    entry["message"] = {"role": "assistant", "content": c.text,
                                        "refusal": None}
                else:
                    entry["text"] = c.text
                entry["logprobs"] = self._logprobs(list(c.token_ids), c.logprobs)
                entry["finish_reason"] = c.finish_reason
                entry["stop_reason"] = c.stop_reason
                choices.append(entry)
        return {**self._head(self.object), "choices": choices, "usage": self.usage(outs),
                "system_fingerprint": None}

    # ---- streaming ----------------------------------------------------------------------------
    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice_delta(self, index: int, text: str, logprobs: dict[str, Any] | None,
                     finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else \
                ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason}


async def sse_events(spec: StreamSpec, first: tuple[int, Any] | None,
                     outputs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
    """The SSE lines of a streamed response, from the first output on."""
    streams: dict[int, proto.ChoiceStream] = {}
    last: dict[int, Any] = {}
    if spec.chat:  # the role first, one chunk per choice, as OpenAI does
        for i in range(spec.n):
            yield spec.chunk([spec.choice_delta(i, "", None, None, first=True)])
    pending = first
    try:
        while pending is not None:
            pi, out = pending
            last[pi] = out
            for c in out.outputs:
                for event in _choice_events(spec, streams, pi * spec.n + c.index, c):
                    yield event
            pending = await anext_or_none(outputs)
    except errors.RadixKVError as exc:  # the engine failed mid-stream: say so, then end
        log.warning("stream %s failed: %s", spec.rid, exc)
        err = proto.APIError(500 if not isinstance(exc, errors.InvalidRequestError) else 400,
                             str(exc), "server_error" if not isinstance(
                                 exc, errors.InvalidRequestError) else "invalid_request_error")
        yield f"data: {json.dumps(err.body())}\n\n"
    if spec.include_usage and last:
        yield spec.chunk([], spec.usage([last[i] for i in sorted(last)]))
    yield "data: [DONE]\n\n"


def _choice_events(spec: StreamSpec, streams: dict[int, proto.ChoiceStream], index: int,
                   c: Any) -> list[str]:
    st = streams.get(index)
    if st is None:
        st = streams[index] = proto.ChoiceStream(stops=spec.stops)
    if st.done:
        return []
    finished = c.finish_reason is not None
    text = st.next_text(c.text, finished)
    new_ids = list(c.token_ids[st.sent_tokens:])
    entries = c.logprobs[st.sent_tokens:] if c.logprobs is not None else None
    lp = spec._logprobs(new_ids, entries, st.text_offset) if new_ids else None
    st.sent_tokens = len(c.token_ids)
    st.text_offset += len(text)
    events = []
    if text or lp is not None:
        events.append(spec.chunk([spec.choice_delta(index, text, lp, None)]))
    if finished:
        st.done = True
        events.append(spec.chunk([spec.choice_delta(index, "", None, c.finish_reason)]))
    return events


async def anext_or_none(it: AsyncIterator[T]) -> T | None:
    """The next item, or None once the iterator is exhausted."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None
