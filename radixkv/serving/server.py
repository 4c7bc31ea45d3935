"""`radixkv serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) driving `AsyncLLM`.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Every response's usage carries `prompt_tokens_details.cached_tokens` (the prompt tokens served
from the prefix cache); `cache_salt` in the body maps to the engine's namespace, so requests with
different salts never share KV. Streams are server-sent events. A client that disconnects aborts
its request. At most `max_running_requests + max_queue` sequences are admitted; beyond that the
answer is 503 with Retry-After (backpressure, not an unbounded queue). SIGTERM (or Ctrl+C) drains:
new requests get 503, in-flight ones may finish within `shutdown_timeout`, the rest are aborted,
and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixkv import errors
from radixkv.serving import openai_protocol as proto
from radixkv.serving.metrics import CONTENT_TYPE, ServerMetrics
from radixkv.serving.sse import StreamSpec, anext_or_none, sse_events

log = logging.getLogger("radixkv.serve")
T = TypeVar("T")
Outputs = AsyncIterator[tuple[int, Any]]  # (prompt index, RequestOutput)


@dataclass(slots=True)
class ServerConfig:
    """Server settings besides the engine's own (those are the AsyncLLM's arguments)."""

    served_model_name: str | None = None  # None: the model's file stem
    api_key: str | None = None
    max_queue: int = 256  # sequences that may wait beyond the running batch
    shutdown_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    retry_after_s: int = 1


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class OpenAIServer:
    """The app and its state: admission counts, the drain, metrics. One per process."""

    def __init__(self, llm: Any, config: ServerConfig, max_running_requests: int) -> None:
        self.llm = llm
        self.config = config
        self.model_name = config.served_model_name or llm.model_name
        self.limit = min(int(llm.max_context), int(llm.pool_size))  # tokens per request
        self.capacity = max_running_requests + config.max_queue
        self.active = 0  # admitted sequences not yet done
        self.inflight: set[str] = set()  # engine request ids running now
        self.draining = False
        self._drain_deadline = 0.0
        self._abort_deadline: float | None = None
        self.created = proto.now()
        self.metrics = ServerMetrics(llm.cache_stats, self._gauges)
        self._token_text: dict[int, str] = {}
        self.app = self._build_app()

    def _gauges(self) -> dict[str, float]:
        return {"server_active_sequences": float(self.active),
                "server_draining": float(self.draining)}

    # ---- app ----------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            yield
            self.llm.shutdown()

        app = FastAPI(title="radixkv", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)
        app.add_exception_handler(proto.APIError, self._on_api_error)
        app.add_exception_handler(StarletteHTTPException, self._on_http_error)
        app.add_exception_handler(RequestValidationError, self._on_validation_error)
        app.add_exception_handler(errors.RadixKVError, self._on_radixkv_error)
        app.add_exception_handler(Exception, self._on_unexpected)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.model_info, methods=["GET"])
        # What sglang-router asks a worker when it registers it (it falls back from the first
        # name of each pair to the second); the model id it then routes under is
        # `served_model_name`, so requests through the router name a model this server accepts.
        for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
            app.add_api_route(path, self.router_info, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        return app

    def _error_response(self, err: proto.APIError) -> JSONResponse:
        self.metrics.observe_error(err.type, err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def _on_api_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, proto.APIError)
        return self._error_response(exc)

    async def _on_http_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return self._error_response(proto.APIError(exc.status_code, str(exc.detail), type_))

    async def _on_validation_error(self, request: Request, exc: Exception) -> JSONResponse:
        return self._error_response(proto.bad_request(str(exc)))

    async def _on_radixkv_error(self, request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, errors.InvalidRequestError):
            return self._error_response(proto.bad_request(str(exc)))
        log.error("%s serving %s: %s", type(exc).__name__, request.url.path, exc)
        return self._error_response(proto.APIError(500, f"{type(exc).__name__}: {exc}",
                                                   "server_error"))

    async def _on_unexpected(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return self._error_response(proto.APIError(500, "internal server error", "server_error"))

    # ---- checks -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise proto.APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                 "authentication_error", code="invalid_api_key")

    def _unavailable(self, message: str, code: str) -> proto.APIError:
        return proto.APIError(503, message, "service_unavailable_error", code=code,
                              headers={"Retry-After": str(self.config.retry_after_s)})

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise proto.APIError(404, f"the model {model!r} does not exist; this server serves "
                                 f"{self.model_name!r}", "not_found_error", param="model",
                                 code="model_not_found")

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise proto.bad_request(f"the body is not valid JSON: {exc}") from None

    # ---- simple endpoints ---------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        if self.draining:
            return self._error_response(self._unavailable("shutting down", "shutting_down"))
        return JSONResponse({"status": "ok"})

    async def metrics_text(self) -> Response:
        # cache_stats() waits for the engine thread (up to a step): keep the event loop free.
        body = await asyncio.to_thread(self.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "radixkv", "max_model_len": self.limit}

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request: Request, model_id: str) -> JSONResponse:
        self._authorize(request)
        self._check_model(model_id)
        return JSONResponse(self._model_card())

    async def router_info(self) -> JSONResponse:
        """Worker metadata for routers (SGLang's field names). No tokenizer path is given: a
        router would try to fetch it from a hub, and cache-aware routing works on text."""
        return JSONResponse({"served_model_name": self.model_name,
                             "is_generation": True, "max_total_num_tokens": self.llm.pool_size,
                             "max_model_len": self.limit, "engine": "radixkv"})

    # ---- generation endpoints -----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = proto.parse_request(proto.ChatCompletionRequest, await self._json(request))
        assert isinstance(req, proto.ChatCompletionRequest)
        self._check_model(req.model)
        messages = proto.chat_messages(req)
        try:
            ids = list(self.llm.apply_chat_template(messages))
        except errors.RadixKVError:
            raise
        except Exception as exc:  # a template that rejects the conversation (e.g. roles)
            raise proto.bad_request(f"the chat template cannot render these messages: {exc}",
                                    param="messages") from None
        return await self._generate(request, req, [ids], chat=True)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = proto.parse_request(proto.CompletionRequest, await self._json(request))
        assert isinstance(req, proto.CompletionRequest)
        self._check_model(req.model)
        prompts = proto.completion_prompts(req)
        ids = [self.llm.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str)
               else p for p in prompts]
        if any(not x for x in ids):
            raise proto.bad_request("a prompt encodes to no tokens", param="prompt")
        return await self._generate(request, req, ids, chat=False)

    async def _generate(self, request: Request, req: Any, prompts: list[list[int]],
                        chat: bool) -> Response:
        n = proto.requested_n(req)
        k = proto.num_logprobs(req)
        params = [proto.to_sampling_params(req, proto.max_new_tokens(req, len(p), self.limit),
                                           n, k) for p in prompts]
        if self.draining:
            raise self._unavailable("the server is shutting down", "shutting_down")
        seqs = n * len(prompts)
        if self.active and self.active + seqs > self.capacity:
            raise self._unavailable(f"too many requests queued ({self.active} sequences "
                                    f"admitted, at most {self.capacity}); retry later",
                                    "queue_full")
        rid = proto.new_id("chatcmpl" if chat else "cmpl")
        spec = StreamSpec(rid=rid, created=proto.now(), model=self.model_name, chat=chat, n=n,
                          logprobs=k, stops=tuple(params[0].stop_strings),
                          include_usage=bool(req.stream_options and
                                             req.stream_options.include_usage),
                          decode=self._decode_token)
        self.active += seqs
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= seqs

        outputs = self._outputs(prompts, params, req.cache_salt, rid)
        try:
            first = await self._until_disconnect(request, anext_or_none(outputs))
        except BaseException as exc:
            await aclose_shielded(outputs)
            release()
            if isinstance(exc, ClientGone):
                return Response(status_code=499)  # nobody reads it; the request was aborted
            raise
        if req.stream:
            async def cleanup() -> None:
                await aclose_shielded(outputs)
                release()

            body = self._sse(spec, first, outputs, release)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(cleanup))
        try:
            last: dict[int, Any] = {}
            if first is not None:
                last[first[0]] = first[1]

            async def consume() -> None:
                async for pi, out in outputs:
                    last[pi] = out

            await self._until_disconnect(request, consume())
        except ClientGone:
            return Response(status_code=499)
        finally:
            await aclose_shielded(outputs)
            release()
        return JSONResponse(spec.full_response([last[i] for i in sorted(last)]))

    async def _sse(self, spec: StreamSpec, first: tuple[int, Any] | None, outputs: Outputs,
                   release: Callable[[], None]) -> AsyncIterator[str]:
        try:
            async for event in sse_events(spec, first, outputs):
                yield event
        finally:
            await aclose_shielded(outputs)
            release()

    def _decode_token(self, tok: int) -> str:
        text = self._token_text.get(tok)
        if text is None:
            text = self._token_text[tok] = self.llm.tokenizer.decode([tok])
        return text

    # ---- driving the engine -------------------------------------------------------------------
    async def _one(self, prompt: list[int], params: Any, namespace: Any,
                   rid: str) -> AsyncIterator[Any]:
        """One engine request's outputs; leaving early (or a cancel) aborts it."""
        gen = self.llm.generate(prompt, params, request_id=rid, namespace=namespace)
        self.inflight.add(rid)
        last = None
        try:
            async for out in gen:
                last = out
                yield out
        finally:
            self.inflight.discard(rid)
            with anyio.CancelScope(shield=True):
                await gen.aclose()
                if last is None or not last.finished:
                    await self.llm.abort(rid)

    async def _outputs(self, prompts: list[list[int]], params: list[Any], namespace: Any,
                       rid: str) -> Outputs:
        """(prompt index, RequestOutput) of every prompt, merged as they come; the last output
        of each prompt is counted in the metrics, finished or not."""
        last: dict[int, Any] = {}
        try:
            if len(prompts) == 1:
                async for out in self._one(prompts[0], params[0], namespace, rid):
                    last[0] = out
                    yield 0, out
                return
            queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
            done = object()

            async def pump(i: int) -> None:
                try:
                    async for out in self._one(prompts[i], params[i], namespace, f"{rid}-{i}"):
                        queue.put_nowait((i, out, None))
                except Exception as exc:  # handed to the consumer, which re-raises it
                    queue.put_nowait((i, None, exc))
                finally:
                    queue.put_nowait((i, done, None))

            tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
            try:
                left = len(tasks)
                while left:
                    i, out, exc = await queue.get()
                    if exc is not None:
                        raise exc
                    if out is done:
                        left -= 1
                        continue
                    last[i] = out
                    yield i, out
            finally:
                for t in tasks:
                    t.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for out in last.values():
                self._observe(out)

    def _observe(self, out: Any) -> None:
        m = out.metrics
        self.metrics.observe_request(
            len(out.prompt_token_ids), [len(c.token_ids) for c in out.outputs],
            [c.finish_reason for c in out.outputs], m.arrival_time, m.first_token_time,
            m.finished_time)

    async def _until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (and raising ClientGone) if the client disconnects."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)
            watch.cancel()
        if task.cancelled():
            raise ClientGone()
        try:
            return task.result()
        except errors.InvalidRequestError as exc:
            raise proto.bad_request(str(exc)) from None

    # ---- drain --------------------------------------------------------------------------------
    def start_drain(self) -> None:
        if not self.draining:
            log.info("draining: %d sequences in flight, %.0f s to finish", self.active,
                     self.config.shutdown_timeout)
            self.draining = True
            self._drain_deadline = time.monotonic() + self.config.shutdown_timeout

    async def drain_step(self) -> bool:
        """One tick of the drain; True once the process may exit."""
        if self.active == 0:
            return True
        now = time.monotonic()
        if now < self._drain_deadline:
            return False
        if self._abort_deadline is None:
            log.info("shutdown timeout: aborting %d requests", len(self.inflight))
            for rid in list(self.inflight):
                await self.llm.abort(rid)
            self._abort_deadline = now + 5.0
            return False
        return now >= self._abort_deadline


async def aclose_shielded(it: Any) -> None:
    with anyio.CancelScope(shield=True):
        await it.aclose()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---- process ----------------------------------------------------------------------------------
def run_server(llm: Any, config: ServerConfig, host: str, port: int,
               max_running_requests: int, log_level: str = "warning") -> int:
    """Serve until SIGTERM / SIGINT, then drain; returns the exit status (0 after a drain)."""
    import uvicorn

    server = OpenAIServer(llm, config, max_running_requests)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded in _captured_signals: uvicorn would re-raise it on exit, and the
            # default SIGTERM action would end the process with -15 instead of 0.
            if not server.draining:
                server.start_drain()
                return
            if self.should_exit:  # a third signal: stop waiting for connections too
                self.force_exit = True
            self.should_exit = True  # a second signal: stop draining

        async def on_tick(self, counter: int) -> bool:
            if server.draining and not self.should_exit and await server.drain_step():
                self.should_exit = True
            return await super().on_tick(counter)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and self.servers:
                h, p = self.servers[0].sockets[0].getsockname()[:2]
                print(f"radixkv serve: {server.model_name} on http://{h}:{p}", flush=True)

    cfg = uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                         timeout_graceful_shutdown=5, lifespan="on")
    srv = _Server(cfg)
    # This process exists to serve one model: what is loaded now lives until exit, so it is
    # moved out of the collector's reach and the engine loop's collections scan only new
    # objects (py-spy, batch-1 decode: 3% of the time was in gc scanning the model's objects).
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(srv.serve())
    finally:
        llm.shutdown()
    if not srv.started:
        print("radixkv serve: error: the server did not start", file=sys.stderr)
        return 1
    return 0
