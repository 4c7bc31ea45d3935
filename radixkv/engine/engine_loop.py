"""`EngineLoop`: one thread owns the engine; callers talk to it through queues only.

Callers (any number of threads, or an asyncio loop) validate their requests themselves, then hand
them to the loop with `submit`. The loop drains its inbox between steps, so a request that
arrives while a batch runs joins at the next step (continuous batching across callers), and
blocks on the inbox when it has nothing to run (no busy spin). After each step it delivers a
`RequestOutput` to each touched request's sink and forgets finished requests, so bookkeeping
stays bounded. Aborts and every other engine access (`call`) run on the loop thread, between
steps, so engine state is never shared.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from radixkv.engine.beam_search import BeamSearchParams
from radixkv.engine.engine import Engine
from radixkv.engine.outputs import CompletionOutput, RequestOutput
from radixkv.engine.request import Request
from radixkv.engine.sampling_params import SamplingParams
from radixkv.errors import EngineError, InvalidRequestError

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput, BaseException | None], None]


@dataclass(slots=True)
class Sink:
    """Where a request's outputs go. `stream=False` gets only the final output."""

    callback: OutputCallback
    stream: bool


@dataclass(slots=True)
class _Add:
    rid: str
    prompt_ids: np.ndarray
    params: SamplingParams | BeamSearchParams
    namespace: Any
    prompt: str | None
    sink: Sink


@dataclass(slots=True)
class _Call:
    fn: Callable[[Engine], Any]
    future: concurrent.futures.Future


_STOP = object()
_LOOPS: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _stop_all_loops() -> None:  # no engine thread outlives the interpreter
    for loop in list(_LOOPS):
        loop.shutdown(timeout=5.0)


class EngineLoop:
    """Runs `engine.step()` on its own thread while requests exist; see the module docstring."""

    def __init__(self, engine: Engine | Callable[[], Engine],
                 name: str = "radixkv-engine") -> None:
        """`engine`: the engine, or a function that builds it (called on the loop thread).

        Why build it there: every torch op with OpenMP parallelism should run on one thread.
        Each thread that runs a parallel region gets its own libgomp thread pool, and with more
        pool threads than cores libgomp stops spinning between regions, so each region pays a
        futex wake-up. Measured on 2 cores, a oneDNN decode product + the attention kernel ran
        2x slower on a thread other than the one that had loaded the weights (85 vs 188 us).
        Building the engine (model load, weight packing) on the loop thread keeps all of it on
        one pool. A caller's own parallel torch work on other threads brings the slowdown back.
        """
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # loop thread only
        self._live: set[str] = set()  # request ids submitted and not yet delivered as finished
        self._live_lock = threading.Lock()
        self._closed = False
        factory = engine if not isinstance(engine, Engine) else None
        self.engine: Engine = engine if isinstance(engine, Engine) else None  # type: ignore
        ready: concurrent.futures.Future[Engine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(factory, ready), name=name,
                                        daemon=True)
        self._thread.start()
        try:
            self.engine = ready.result()  # the factory's exception, if it raised
        except BaseException:
            with self._live_lock:  # e.g. Ctrl-C during the load: the thread ends after it
                self._closed = True
                self._inbox.put(_STOP)
            raise
        _LOOPS.add(self)

    # ---- caller side (any thread) -----------------------------------------------------------
    def submit(self, rid: str, prompt_ids: np.ndarray, params: SamplingParams | BeamSearchParams,
               namespace: Any,
               sink: Sink, prompt: str | None = None) -> None:
        """Queue a validated request. Raises `InvalidRequestError` if `rid` is in use and
        `EngineError` after shutdown, both before anything is queued."""
        item = _Add(rid, prompt_ids, params, namespace, prompt, sink)
        with self._live_lock:  # queued under the lock: nothing can land behind the stop marker
            if self._closed:
                raise EngineError("the engine loop has been shut down")
            if rid in self._live:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            self._live.add(rid)
            self._inbox.put(item)

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the loop thread between steps; its result as a Future (failing
        with `EngineError` once the loop is shut down)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._live_lock:
            if not self._closed and self._thread.is_alive():
                self._inbox.put(_Call(fn, fut))
                return fut
        fut.set_exception(EngineError("the engine loop is not running"))
        return fut

    def abort(self, rid: str) -> concurrent.futures.Future:
        """Abort `rid` at the next step boundary; the Future says whether it was running."""
        return self.call(lambda engine: self._abort(rid))

    def num_unfinished(self) -> int:
        with self._live_lock:
            return len(self._live)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop: abort what is left (its callers get a final "abort" output), join."""
        with self._live_lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_STOP)  # the last item: submit and call check _closed first
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- loop thread ------------------------------------------------------------------------
    def _main(self, factory: Callable[[], Engine] | None,
              ready: concurrent.futures.Future[Engine]) -> None:
        try:
            if factory is not None:
                self.engine = factory()
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor
            ready.set_exception(exc)
            return
        ready.set_result(self.engine)
        self._run()

    def _run(self) -> None:
        engine = self.engine
        while True:
            try:
                item = self._inbox.get(block=not engine.has_work())
            except queue.Empty:
                item = None
            stop = False
            while item is not None:
                if item is _STOP:
                    stop = True
                else:
                    self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if stop:
                for rid in list(self._sinks):
                    self._abort(rid)
                engine.close()  # flushes the KV tier's pending writes (bounded)
                return
            if engine.has_work():
                self._step()

    def _handle(self, item: _Add | _Call) -> None:
        if isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn(self.engine))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    item.future.set_exception(exc)
            return
        try:
            req = self.engine.add_request(item.prompt_ids, item.params, item.namespace,
                                          rid=item.rid, prompt=item.prompt)
        except Exception as exc:  # noqa: BLE001 - validated by the caller; belt and braces
            self._forget(item.rid)
            item.sink.callback(_empty_output(item), exc)
            return
        self._sinks[req.rid] = item.sink

    def _step(self) -> None:
        try:
            touched = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a bug outside the forward: fail everyone
            log.exception("engine step failed outside the model forward")
            err = EngineError(f"engine step failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            for rid in list(self._sinks):
                req = self.engine.requests.get(rid)
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001 - keep releasing the others
                    log.exception("abort after a failed step raised")
                self._deliver_final(rid, req, err)
            return
        for req in touched:
            self._deliver(req)

    def _deliver(self, req: Request) -> None:
        sink = self._sinks.get(req.rid)
        if sink is None:
            return
        if req.finished:
            self._deliver_final(req.rid, req, req.error)
        elif sink.stream:
            try:
                sink.callback(Engine.output(req), None)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the loop
                log.exception("output callback raised")

    def _deliver_final(self, rid: str, req: Request | None, err: BaseException | None) -> None:
        sink = self._sinks.pop(rid, None)
        self.engine.requests.pop(rid, None)
        self._forget(rid)
        if sink is not None and req is not None:
            try:
                sink.callback(Engine.output(req), err)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the loop
                log.exception("output callback raised")

    def _abort(self, rid: str) -> bool:
        req = self.engine.requests.get(rid)
        if req is None or not self.engine.abort(rid):
            return False
        self._deliver_final(rid, req, None)
        return True

    def _forget(self, rid: str) -> None:
        with self._live_lock:
            self._live.discard(rid)


def _empty_output(item: _Add) -> RequestOutput:
    return RequestOutput(item.rid, item.prompt, item.prompt_ids.tolist(),
                         [CompletionOutput(0, "", [], "error")], True)
