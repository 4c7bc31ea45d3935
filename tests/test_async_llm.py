"""`AsyncLLM` on the tiny random Llama: many asyncio tasks on one engine loop.

Oracles: each prompt run alone (greedy, token for token), `check_no_leak()` once idle, the
cumulative-snapshot contract of streamed outputs, and the set of live threads.
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from radixkv import LLM, AsyncLLM, RequestOutput, SamplingParams
from radixkv.errors import EngineError, InvalidRequestError
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.test_engine_loop import GREEDY, assert_idle_and_clean, prompts


@pytest.fixture(scope="module")
def alone(tiny_llama_dir):  # noqa: F811
    with LLM(str(tiny_llama_dir), max_total_tokens=4096, enable_prefix_cache=False) as solo:
        return [solo.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts(32, 1)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):  # noqa: F811
    llm = AsyncLLM(str(tiny_llama_dir), max_total_tokens=4096)
    yield llm
    llm.shutdown()


async def wait_idle(llm: AsyncLLM) -> None:
    """Let abandoned generators be closed (the event loop's finaliser) and their aborts run."""
    for _ in range(2000):
        if llm.num_unfinished() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{llm.num_unfinished()} requests never finished")


def check_snapshots(outs: list[RequestOutput]) -> None:
    """Streamed outputs are cumulative: tokens and text only grow; only the last is final."""
    for a, b in zip(outs, outs[1:], strict=False):
        ca, cb = a.outputs[0], b.outputs[0]
        assert cb.token_ids[:len(ca.token_ids)] == ca.token_ids and len(cb.token_ids) > len(
            ca.token_ids)
        assert cb.text.startswith(ca.text)
        assert not a.finished
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason is not None


def test_32_tasks_with_a_third_cancelled(llm, alone):
    ps = prompts(32, 1)
    rng = random.Random(5)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    kinds = ["full"] * 32
    for i in rng.sample(range(32), 11):
        kinds[i] = rng.choice(["break", "cancel"])

    async def consume(i: int, stop_after: int) -> list[RequestOutput]:
        outs = []
        async for out in llm.generate(ps[i], params, request_id=f"t{i}"):
            outs.append(out)
            if kinds[i] == "break" and len(outs) == stop_after:
                break  # leaving the async for early: the generator is dropped unfinished
        return outs

    async def main() -> list:
        tasks = [asyncio.create_task(consume(i, rng.randint(1, 6))) for i in range(32)]
        for i, t in enumerate(tasks):
            if kinds[i] == "cancel":
                asyncio.get_running_loop().call_later(rng.random() * 0.3, t.cancel)
        res = await asyncio.gather(*tasks, return_exceptions=True)
        await wait_idle(llm)
        return res

    res = asyncio.run(main())
    for i, r in enumerate(res):
        if kinds[i] == "full":
            check_snapshots(r)
            assert r[-1].outputs[0].token_ids == alone[i] and r[-1].request_id == f"t{i}"
        elif kinds[i] == "cancel":
            assert isinstance(r, asyncio.CancelledError) or r[-1].outputs[0].token_ids == alone[i]
        else:
            assert len(r) <= 6 and r[-1].outputs[0].token_ids == alone[i][:len(
                r[-1].outputs[0].token_ids)]
    assert sum(isinstance(r, asyncio.CancelledError) for r in res) >= 1
    assert_idle_and_clean(llm)
    stats = llm.cache_stats()
    assert stats["finish_reasons"].get("abort", 0) >= 1


def test_abort_request_ids_messages_and_bad_input(llm, alone):
    ps = prompts(32, 1)
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)

    async def main() -> None:
        gen = llm.generate(ps[0], long, request_id="dup")
        first = await gen.__anext__()
        assert not first.finished
        with pytest.raises(InvalidRequestError, match="already in use"):
            await llm.generate(ps[1], long, request_id="dup").__anext__()
        assert await llm.abort("dup") is True
        rest = [o async for o in gen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert await llm.abort("dup") is False and await llm.abort("never-seen") is False
        # the id is free again once its request is over
        outs = [o async for o in llm.generate(ps[2], GREEDY, request_id="dup")]
        assert outs[-1].outputs[0].token_ids == alone[2]
        with pytest.raises(InvalidRequestError):
            await llm.generate([1, 10 ** 7], GREEDY).__anext__()
        with pytest.raises(InvalidRequestError):
            await llm.generate("hi", GREEDY, messages=[{"role": "user", "content": "x"}]
                               ).__anext__()
        with pytest.raises(InvalidRequestError):
            await llm.generate(messages=[{"role": "user"}]).__anext__()
        conv = [{"role": "user", "content": "Hello there"}]
        outs = [o async for o in llm.generate(messages=conv, sampling_params=GREEDY,
                                              namespace="tenant-a")]
        assert outs[-1].prompt_token_ids == llm.apply_chat_template(conv)
        stats = await llm.get_cache_stats()
        assert stats["requests"] >= 3
        await wait_idle(llm)

    asyncio.run(main())
    assert_idle_and_clean(llm)


def test_forward_error_reaches_the_task(llm, alone, monkeypatch):
    ps = prompts(32, 1)
    runner = llm.engine.runner
    real = runner.forward
    calls = {"n": 0}

    def forward(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(batch)

    monkeypatch.setattr(runner, "forward", forward)

    async def main() -> None:
        with pytest.raises(EngineError, match="injected"):
            async for _ in llm.generate(ps[3], GREEDY):
                pass
        outs = [o async for o in llm.generate(ps[4], GREEDY)]
        assert outs[-1].outputs[0].token_ids == alone[4]

    asyncio.run(main())
    assert_idle_and_clean(llm)


def test_async_context_manager_leaves_no_thread(tiny_llama_dir, alone):  # noqa: F811
    async def main() -> threading.Thread:
        async with AsyncLLM(str(tiny_llama_dir), max_total_tokens=1024) as llm:
            outs = [o async for o in llm.generate(prompts(32, 1)[5], GREEDY)]
            assert outs[-1].outputs[0].token_ids == alone[5]
            # a task still streaming when the context exits gets its request aborted
            gen = llm.generate(prompts(32, 1)[6], SamplingParams(max_tokens=500,
                                                                 ignore_eos=True))
            await gen.__anext__()
            thread = llm.loop._thread
        rest = [o async for o in gen]
        assert rest and rest[-1].outputs[0].finish_reason == "abort"
        return thread

    thread = asyncio.run(main())
    assert not thread.is_alive() and thread not in threading.enumerate()
