"""The engine loop behind a thread-safe `LLM`, on the tiny random Llama.

Oracles: each prompt run alone (greedy, token for token), `check_no_leak()` (free slots + cached
slots == pool size once idle), the loop's own bookkeeping (nothing left once idle) and the set of
live threads.
"""

from __future__ import annotations

import gc
import random
import threading

import numpy as np
import pytest

from radixkv import LLM, SamplingParams
from radixkv.errors import EngineError, InvalidRequestError
from radixkv.serving import llm as llm_module
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts: half extend a shared system prompt (so they share KV), half are strangers."""
    rng = np.random.default_rng(seed)
    system = rng.integers(10, 2000, 24).tolist()
    out = []
    for i in range(n):
        tail = rng.integers(10, 2000, int(rng.integers(1, 20))).tolist()
        out.append(system + tail if i % 2 else tail + [7] * (i % 3))
    return out


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_idle_and_clean(llm: LLM) -> None:
    """No request left anywhere, and every KV slot free or held by the tree."""
    assert llm.num_unfinished() == 0
    llm.check_no_leak()
    state = llm.loop.call(lambda eng: (len(eng.requests), eng.has_work())).result()
    assert state == (0, False)
    assert llm.loop.call(lambda eng: len(llm.loop._sinks)).result() == 0


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):  # noqa: F811
    with LLM(str(tiny_llama_dir), max_total_tokens=4096) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(tiny_llama_dir):  # noqa: F811
    """Oracle: every prompt alone, on its own LLM without the prefix cache."""
    with LLM(str(tiny_llama_dir), max_total_tokens=4096, enable_prefix_cache=False) as solo:
        return [solo.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts(16)]


def run_threads(fn, n: int) -> list:
    """Run fn(i) on n threads released together; returns results (or exceptions) by i."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller thread hangs"
    return results


# ---- concurrency -------------------------------------------------------------------------------
def test_sixteen_threads_equal_each_prompt_alone(llm, alone):
    ps = prompts(16)
    steps0 = llm.cache_stats()["steps"]
    outs = run_threads(lambda i: llm.generate([ps[i]], GREEDY)[0], 16)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert [o.prompt_token_ids for o in outs] == ps
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    # the callers really batched: run one after another, 16 requests need >= 16 * 10 steps
    assert llm.cache_stats()["steps"] - steps0 < 16 * GREEDY.max_tokens
    assert_idle_and_clean(llm)


def test_threads_mixing_generate_stream_and_chat(llm, alone):
    ps = prompts(16)

    def call(i: int):
        if i % 3 == 0:
            return "".join(llm.stream(ps[i], GREEDY))
        return llm.generate([ps[i], ps[(i + 1) % 16]], GREEDY)

    res = run_threads(call, 12)
    for i, r in enumerate(res):
        if i % 3 == 0:
            assert r == llm.tokenizer.decode(alone[i], skip_special_tokens=True)
        else:
            assert tokens(r) == [alone[i], alone[(i + 1) % 16]]
    assert_idle_and_clean(llm)


def test_bad_request_raises_only_to_its_caller(llm, alone):
    ps = prompts(16)
    vocab = llm.lm.config.vocab_size

    def call(i: int):
        if i % 4 == 0:
            return llm.generate([[1, vocab + i]], GREEDY)
        return llm.generate([ps[i]], GREEDY)[0].outputs[0].token_ids

    res = run_threads(call, 8)
    for i, r in enumerate(res):
        if i % 4 == 0:
            assert isinstance(r, InvalidRequestError)
        else:
            assert r == alone[i]
    assert_idle_and_clean(llm)


# ---- abort -------------------------------------------------------------------------------------
def test_abort_unknown_finished_and_racing_ids(llm):
    assert llm.abort("no-such-request") is False
    out = llm.generate([prompts(1)[0]], GREEDY)[0]
    assert llm.abort(out.request_id) is False  # finished and forgotten
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for trial in range(20):
        got: list = []
        rid = f"race-{trial}"
        done = threading.Event()

        def sink(o, err, got=got, done=done):
            got.append((o, err))
            if o.finished:
                done.set()

        llm.loop.submit(rid, np.asarray(prompts(1, trial)[0], dtype=np.int32), params, None,
                        llm_module.Sink(sink, stream=False))
        if rng.random() < 0.5:
            threading.Event().wait(rng.random() * 0.02)
        aborted = llm.abort(rid)
        assert done.wait(30)
        [(o, err)] = got
        assert err is None
        reason = o.outputs[0].finish_reason
        # abort True <=> the request ended by the abort; False <=> it had already finished
        assert (reason == "abort") == aborted
        assert reason in ("abort", "length")
        if reason == "length":
            assert len(o.outputs[0].token_ids) == 3
        assert llm.abort(rid) is False
    assert_idle_and_clean(llm)


def test_closing_a_stream_frees_its_request(llm, alone):
    ps = prompts(16)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    # prompts whose answer shows text from its first token on (the random model also emits
    # special tokens, skipped from the text)
    visible = [i for i in range(16) if llm.tokenizer.decode(alone[i][:1],
                                                            skip_special_tokens=True).strip()]
    assert len(visible) >= 4
    streams = [llm.stream(ps[i], params) for i in visible[:4]]
    for s in streams:
        assert next(s)
    assert llm.num_unfinished() == 4
    other = run_threads(lambda i: llm.generate([ps[5]], GREEDY)[0], 1)[0]
    for s in streams:
        s.close()
    assert other.outputs[0].token_ids == alone[5]
    assert llm.generate([ps[6]], GREEDY)[0].outputs[0].token_ids == alone[6]
    assert_idle_and_clean(llm)


def test_keyboard_interrupt_aborts_only_the_callers_requests(llm, alone, monkeypatch):
    ps = prompts(16)
    real_wait = llm_module._wait
    victim = {}
    interrupted = threading.Event()

    def wait(q):
        if threading.current_thread().name == "victim" and not interrupted.is_set():
            out = real_wait(q)  # a step has run: the victim's requests are in the engine
            interrupted.set()
            victim["first"] = out
            raise KeyboardInterrupt
        return real_wait(q)

    monkeypatch.setattr(llm_module, "_wait", wait)
    aborts0 = llm.cache_stats()["finish_reasons"].get("abort", 0)
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    result: dict = {}

    def victim_call():
        try:
            llm.generate([ps[0], ps[1], ps[2]],
                         [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                          long, long])
        except KeyboardInterrupt:
            result["interrupted"] = True

    t = threading.Thread(target=victim_call, name="victim")
    t.start()
    others = run_threads(lambda i: llm.generate([ps[3 + i]], GREEDY)[0], 4)
    t.join(60)
    assert not t.is_alive() and result == {"interrupted": True}
    assert tokens(others) == alone[3:7]
    assert interrupted.is_set()
    monkeypatch.setattr(llm_module, "_wait", real_wait)
    llm.generate([ps[8]], GREEDY)  # let the abort reach its step boundary
    assert llm.cache_stats()["finish_reasons"].get("abort", 0) - aborts0 == 2
    assert_idle_and_clean(llm)


# ---- a failing forward -------------------------------------------------------------------------
def fail_forward(llm: LLM, monkeypatch, when) -> dict:
    """Make the runner's forward raise once, on the first call where when(call number, batch)."""
    runner = llm.engine.runner
    real = runner.forward
    state: dict = {"calls": 0, "batch": None}

    def forward(batch):
        state["calls"] += 1
        if state["batch"] is None and when(state["calls"], batch):
            state["batch"] = [it.req.rid for it in batch.items]
            raise RuntimeError("injected kernel failure")
        return real(batch)

    monkeypatch.setattr(runner, "forward", forward)
    return state


@pytest.mark.parametrize("at_call", [1, 4])  # the prefill, or a decode step
def test_forward_error_fails_its_batch_only(llm, alone, monkeypatch, at_call):
    ps = prompts(16)
    errors0 = llm.cache_stats()["errors"]
    state = fail_forward(llm, monkeypatch, lambda n, batch: n == at_call)
    with pytest.raises(EngineError, match="injected kernel failure") as info:
        llm.generate(ps[:3], GREEDY)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert state["batch"] is not None and len(state["batch"]) == 3
    assert llm.cache_stats()["errors"] - errors0 == 3
    assert_idle_and_clean(llm)
    # the next requests are served, and from the same (possibly partly cached) prefixes
    assert tokens(llm.generate(ps[:3], GREEDY)) == alone[:3]
    assert_idle_and_clean(llm)


def test_forward_error_spares_requests_outside_the_batch(llm, alone, monkeypatch):
    ps = prompts(16)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = llm.generate([ps[9]], long)[0].outputs[0].text
    gen = llm.stream(ps[9], long)  # decoding while the others' prefill fails
    first = next(gen)
    state = fail_forward(llm, monkeypatch, lambda n, batch: not batch.is_decode)
    res = run_threads(lambda i: llm.generate([ps[i]], GREEDY)[0], 3)
    assert first + "".join(gen) == want  # the stream was never in the failed batch
    failed = set(state["batch"])
    assert failed and sum(isinstance(r, EngineError) for r in res) == len(failed)
    for i, r in enumerate(res):
        if not isinstance(r, EngineError):
            assert r.request_id not in failed and r.outputs[0].token_ids == alone[i]
    assert_idle_and_clean(llm)


# ---- shutdown ----------------------------------------------------------------------------------
def engine_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "radixkv-engine"}


def test_shutdown_stops_the_loop_and_aborts_what_is_left(tiny_llama_dir):  # noqa: F811
    before = engine_threads()
    llm = LLM(str(tiny_llama_dir), max_total_tokens=2048)
    thread = llm.loop._thread
    assert thread in engine_threads() - before
    long = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    gen = llm.stream(prompts(1)[0], long)
    next(gen)
    res: list = []
    t = threading.Thread(target=lambda: res.append(llm.generate([prompts(2)[1]], long)))
    t.start()
    while llm.num_unfinished() < 2:
        threading.Event().wait(0.01)
    llm.shutdown()
    assert not thread.is_alive() and thread not in threading.enumerate()
    t.join(30)
    assert res and res[0][0].outputs[0].finish_reason == "abort"
    list(gen)  # the stream ends (its request was aborted)
    with pytest.raises(EngineError):
        llm.generate([[1, 2, 3]], GREEDY)
    with pytest.raises(EngineError):
        llm.cache_stats()
    llm.shutdown()  # idempotent
    # the engine itself is clean: everything was released
    llm.engine.check_no_leak()


def test_context_manager_and_dropped_llm_leave_no_thread(tiny_llama_dir):  # noqa: F811
    before = engine_threads()
    with LLM(str(tiny_llama_dir), max_total_tokens=1024) as llm:
        llm.generate([[5, 6, 7]], GREEDY)
        thread = llm.loop._thread
    assert not thread.is_alive()
    dropped = LLM(str(tiny_llama_dir), max_total_tokens=1024)
    dropped.generate([[5, 6, 7]], GREEDY)
    thread = dropped.loop._thread
    del dropped
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()  # an LLM nobody references stops its loop
    assert engine_threads() <= before


def test_engine_is_built_on_the_loop_thread_and_build_errors_reach_the_caller(
        tiny_llama_dir) -> None:  # noqa: F811
    """The model load and engine build run on the loop thread (one OpenMP pool for all the
    engine's compute); an error there is raised by the constructor and no thread is left."""
    from radixkv.engine.engine_loop import EngineLoop
    from radixkv.errors import ModelLoadError
    before = engine_threads()
    with pytest.raises(ModelLoadError):
        LLM(str(tiny_llama_dir / "no-such-model.gguf"), max_total_tokens=64)
    built_on: list[threading.Thread] = []

    def build():
        built_on.append(threading.current_thread())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        EngineLoop(build)
    assert built_on and built_on[0] is not threading.current_thread()
    built_on[0].join(10)
    assert engine_threads() <= before
    with LLM(str(tiny_llama_dir), max_total_tokens=256) as llm:
        assert llm.loop.engine.lm is llm.lm  # the loop's engine, loaded by its thread
        assert llm.generate([[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
