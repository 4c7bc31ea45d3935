"""`AsyncLLM`: the asyncio API (vLLM's `AsyncLLM` shapes) over the same engine loop as `LLM`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from typing import Any

from radixkv.engine import SamplingParams
from radixkv.engine.beam_search import BeamSearchOutput, BeamSearchParams
from radixkv.engine.engine_loop import Sink
from radixkv.engine.outputs import RequestOutput
from radixkv.errors import InvalidRequestError
from radixkv.serving.frontend import Frontend, Message, Prompt


class AsyncLLM(Frontend):
    """A model served to many asyncio tasks at once; the constructor takes `LLM`'s arguments.

        async with AsyncLLM() as llm:
            async for out in llm.generate("Hi", SamplingParams(max_tokens=32), request_id="r1"):
                print(out.outputs[0].text)    # cumulative; the last output has finished=True

    The engine runs on its own thread, so the event loop is never blocked by a forward.
    """

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    async def generate(self, prompt: Prompt | None = None,
                       sampling_params: SamplingParams | None = None, *,
                       messages: list[Message] | None = None, request_id: str | None = None,
                       namespace: Hashable = None) -> AsyncIterator[RequestOutput]:
        """Stream cumulative `RequestOutput`s of one request (text or token ids as `prompt`, or a
        conversation as `messages`).

        Bad input raises `InvalidRequestError` at the first iteration, before anything is
        queued. Leaving the `async for` early or cancelling the task aborts the request (its
        memory is freed at the next step). A failed model forward raises `EngineError`.
        """
        ids, text, params = self._prepare(prompt, messages, sampling_params, namespace)
        rid = request_id if request_id is not None else self._new_id()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[RequestOutput, BaseException | None]] = asyncio.Queue()

        def deliver(out: RequestOutput, err: BaseException | None) -> None:  # loop thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, (out, err))
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        self.loop.submit(rid, ids, params, namespace, Sink(deliver, stream=True), prompt=text)
        done = False
        try:
            while not done:
                out, err = await q.get()
                while not q.empty() and not out.finished and err is None:
                    out, err = q.get_nowait()  # a slow consumer skips to the latest snapshot
                done = out.finished or err is not None
                if err is not None:
                    raise err
                yield out
        finally:
            if not done:
                self.loop.abort(rid)

    async def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                          namespace: Hashable = None) -> list[BeamSearchOutput]:
        """`LLM.beam_search` for asyncio: one `BeamSearchOutput` per prompt, in order. Bad
        input raises `InvalidRequestError` before anything is queued; cancelling the task
        aborts the searches still running."""
        from radixkv.serving.llm import _as_prompt_list

        if not isinstance(params, BeamSearchParams):
            raise InvalidRequestError(f"beam_search takes BeamSearchParams, got {params!r}")
        prepared = [self._prepare(p, None, params, namespace) for p in _as_prompt_list(prompts)]
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future] = []
        rids: list[str] = []
        try:
            for ids, text, bp in prepared:
                fut = loop.create_future()

                def deliver(out: Any, err: BaseException | None, fut: asyncio.Future = fut
                            ) -> None:  # loop thread
                    def settle() -> None:
                        if not fut.done():
                            fut.set_exception(err) if err is not None else fut.set_result(out)
                    try:
                        loop.call_soon_threadsafe(settle)
                    except RuntimeError:  # the event loop is closed: nobody is listening
                        pass

                rid = self._new_id()
                self.loop.submit(rid, ids, bp, namespace, Sink(deliver, stream=False),
                                 prompt=text)
                rids.append(rid)
                futs.append(fut)
            return list(await asyncio.gather(*futs))
        except BaseException:
            for rid, fut in zip(rids, futs, strict=True):
                if not fut.done():
                    self.loop.abort(rid)
            raise

    async def abort(self, request_id: str) -> bool:
        """Abort a queued or running request; False if unknown or already finished."""
        return await asyncio.wrap_future(self.loop.abort(request_id))

    async def get_cache_stats(self) -> dict[str, Any]:
        """`cache_stats()` without blocking the event loop."""
        return await asyncio.wrap_future(self.loop.call(type(self.engine).stats))
