"""Parallel sampling (`SamplingParams(n > 1)`): one prefill, n samples forked in the engine.

Oracles: the prefill counter of the same request with n = 1; separate seeded requests (sample i
uses seed + i); a fresh prefill of each sample's own sequence for its KV; slot accounting
between steps (every slot free, in the tree or owned by exactly one sequence).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from radixkv import LLM, AsyncLLM, SamplingParams
from radixkv.engine import Engine, EngineConfig, Status
from radixkv.errors import InvalidRequestError
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)
from tests.fork_fixtures import assert_slot_accounting

RNG = np.random.default_rng(0)
PROMPT = RNG.integers(10, 2000, 30).tolist()  # 30: not a multiple of page_size 4
OTHERS = [RNG.integers(10, 2000, n).tolist() for n in (7, 19, 40)]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):  # noqa: F811
    from radixkv.model import load_model

    return load_model(str(tiny_llama_dir))


def make_engine(lm, **kw) -> Engine:
    kw.setdefault("max_total_tokens", 4096)
    return Engine(lm, EngineConfig(**kw))


def run(engine: Engine, hook=None) -> None:
    while engine.has_work():
        engine.step()
        if hook is not None:
            hook(engine)
    engine.check_no_leak()


def sampled(n: int, seed: int | None = 11, max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True, **kw)


@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("page_size", [1, 4])
def test_prefill_once(lm, n, page_size):
    """The prefill work of an n-request equals that of n = 1, alone and inside a batch."""
    counts = {}
    for width in (1, n):
        for with_others in (False, True):
            eng = make_engine(lm, page_size=page_size)
            if with_others:
                for p in OTHERS:
                    eng.add_request(p, sampled(1, seed=None))
            req = eng.add_request(PROMPT, sampled(width))
            run(eng, assert_slot_accounting)
            out = eng.output(req)
            assert [c.index for c in out.outputs] == list(range(width))
            assert all(len(c.token_ids) == 8 and c.finish_reason == "length"
                       for c in out.outputs)
            counts[width, with_others] = eng.stats()["prefill_tokens_computed"]
    assert counts[n, False] == counts[1, False] == len(PROMPT)
    assert counts[n, True] == counts[1, True] == len(PROMPT) + sum(map(len, OTHERS))


def test_seeded_samples_equal_separate_seeded_requests(lm):
    """Sample i of an n-request with seed s equals a request with seed s + i, whatever the
    batch around it."""
    eng = make_engine(lm)
    for p in OTHERS:
        eng.add_request(p, sampled(1, seed=None))
    req = eng.add_request(PROMPT, sampled(4, seed=5))
    run(eng)
    got = [c.token_ids for c in eng.output(req).outputs]
    alone = []
    for i in range(4):
        e2 = make_engine(lm, enable_prefix_cache=False)
        r = e2.add_request(PROMPT, sampled(1, seed=5 + i))
        run(e2)
        alone.append(e2.output(r).outputs[0].token_ids)
    assert got == alone
    assert len({tuple(t) for t in got}) > 1  # the samples differ


def test_copy_on_write_page_size_4(lm):
    """With page_size 4 the partial last prompt page is copied per sample: no slot is written
    while another sequence reads it or the tree holds it, and each sample's KV equals a fresh
    prefill of its own sequence."""
    eng = make_engine(lm, page_size=4)
    forward = eng.runner.forward

    def checked(batch):
        written = torch.cat([it.slots for it in batch.items]).numpy()
        assert not np.isin(written, eng.cache.cached_slots()).any()
        for req in eng.scheduler.running:
            row = eng.req_pool.req_to_token[req.row, :req.kv_len].to(torch.int64).numpy()
            assert not np.isin(written, row).any(), "a slot another sequence reads is written"
        return forward(batch)

    eng.runner.forward = checked
    req = eng.add_request(PROMPT, sampled(4, max_tokens=9))
    forks = []

    def after(e):
        assert_slot_accounting(e)
        if req.status is Status.FORKED and not forks:
            forks.append([(s.cached_len, s.kv_len) for s in req.samples])
            rows = [e.req_pool.req_to_token[s.row, :s.kv_len].to(torch.int64).numpy()
                    for s in req.samples]
            tails = np.concatenate([r[s.cached_len:] for r, s in zip(rows, req.samples,
                                                                           strict=True)])
            assert np.unique(tails).size == tails.size == 4 * (len(PROMPT) % 4)
            assert all(np.array_equal(r[:28], rows[0][:28]) for r in rows)

    run(eng, after)
    assert forks and forks[0] == [(28, 30)] * 4
    for c in eng.output(req).outputs:
        seq = PROMPT + c.token_ids
        fresh = make_engine(lm, page_size=4)
        fresh.add_request(seq, SamplingParams(temperature=0.0, max_tokens=1))
        run(fresh)
        n = (len(seq) - 1) // 4 * 4  # the sample's own KV stops before its last token
        a = eng.cache.match_prefix(seq[:n], record=False)
        b = fresh.cache.match_prefix(seq[:n], record=False)
        assert a.length == b.length == n
        for layer in range(eng.kv_pool.num_layers):
            for buf_a, buf_b in zip(eng.kv_pool.get_kv_buffer(layer),
                                    fresh.kv_pool.get_kv_buffer(layer), strict=True):
                torch.testing.assert_close(buf_a[a.slots], buf_b[b.slots], atol=1e-4,
                                           rtol=1e-4)


def test_cache_off_forks_copy(lm):
    """Without the prefix cache the forks copy the prompt's KV; samples are unchanged."""
    outs = []
    for cache in (True, False):
        eng = make_engine(lm, enable_prefix_cache=cache, page_size=4)
        req = eng.add_request(PROMPT, sampled(3, seed=2))
        run(eng, assert_slot_accounting if cache else None)
        outs.append([c.token_ids for c in eng.output(req).outputs])
        assert eng.stats()["prefill_tokens_computed"] == len(PROMPT)
    assert outs[0] == outs[1]


def test_sample_finishing_early_releases_only_its_tail(lm):
    eng = make_engine(lm)
    req = eng.add_request(PROMPT, sampled(4, seed=9, max_tokens=10))
    run(eng)
    full = [c.token_ids for c in eng.output(req).outputs]
    j = next(i for i in range(1, 10) if full[0][i] not in full[0][:i])
    stop = full[0][j]  # sample 0 stops early, at its first occurrence of this token
    eng = make_engine(lm)
    req = eng.add_request(PROMPT, sampled(4, seed=9, max_tokens=10, stop_token_ids=[stop]))
    seen = []

    def after(e):
        assert_slot_accounting(e)
        live = [s for s in req.samples if s.status is Status.RUNNING]
        seen.append(len(live))

    run(eng, after)
    out = eng.output(req)
    assert out.outputs[0].token_ids == full[0][:j + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    for got, ref in zip(out.outputs[1:], full[1:], strict=True):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert got.token_ids == ref[:cut]
    assert 0 < min(seen[1:-1] or [1]) and max(seen) == 4 and seen[-1] == 0


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "forked"])
def test_abort_releases_every_sample(lm, when):
    eng = make_engine(lm, page_size=4, chunked_prefill_size=8)
    other = eng.add_request(OTHERS[0], sampled(1, seed=None, max_tokens=20))
    req = eng.add_request(PROMPT, sampled(4, max_tokens=20))
    steps = {"waiting": 0, "mid_prefill": 2, "forked": 7}[when]
    for _ in range(steps):
        eng.step()
    if when == "forked":
        assert req.status is Status.FORKED
    elif when == "mid_prefill":
        assert req.status is Status.RUNNING and req.kv_len < len(PROMPT)
    assert eng.abort(req.rid)
    assert_slot_accounting(eng)
    out = eng.output(req)
    assert out.finished and all(c.finish_reason == "abort" for c in out.outputs)
    assert not eng.abort(req.rid)
    run(eng)
    assert other.finished and other.finish_reason == "length"
    assert eng.scheduler.reserved_rows == 0


def test_preempted_samples_match_unconstrained(lm):
    """A pool too small for every sequence at once: samples are preempted and resumed alone
    (seeded, so their tokens do not change)."""
    params = sampled(4, seed=3, max_tokens=40)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = []
    for pool in (4096, 200):
        eng = make_engine(lm, max_total_tokens=pool, page_size=2)
        req = eng.add_request(PROMPT, params)
        other = eng.add_request(OTHERS[2], greedy)
        run(eng, assert_slot_accounting)
        outs.append(([c.token_ids for c in eng.output(req).outputs], other.output_ids))
    assert eng.stats()["preemptions"] > 0
    assert outs[0] == outs[1]


def test_greedy_samples_are_equal(lm):
    eng = make_engine(lm)
    req = eng.add_request(PROMPT, SamplingParams(n=3, temperature=0.0, max_tokens=6))
    run(eng)
    outs = [c.token_ids for c in eng.output(req).outputs]
    assert outs[0] == outs[1] == outs[2]


def test_bad_n_raises_before_queueing(lm):
    eng = make_engine(lm, max_running_requests=4, max_total_tokens=256)
    with pytest.raises(InvalidRequestError):
        SamplingParams(n=0)
    with pytest.raises(InvalidRequestError, match="max_running_requests"):
        eng.add_request(PROMPT, sampled(5))
    with pytest.raises(InvalidRequestError, match="KV pool"):
        eng.add_request(PROMPT, sampled(4, max_tokens=60))
    assert not eng.has_work() and not eng.requests
    eng.check_no_leak()


def test_llm_and_async_llm_return_n_outputs(tiny_llama_dir):  # noqa: F811
    params = sampled(3, seed=1)
    with LLM(str(tiny_llama_dir), max_total_tokens=2048, page_size=4) as llm:
        out = llm.generate([PROMPT, OTHERS[1]], params)
        assert [len(o.outputs) for o in out] == [3, 3]
        assert llm.cache_stats()["prefill_tokens_computed"] == len(PROMPT) + len(OTHERS[1])
        llm.check_no_leak()

    async def go():
        async with AsyncLLM(str(tiny_llama_dir), max_total_tokens=2048, page_size=4) as allm:
            last = None
            async for o in allm.generate(PROMPT, params):
                last = o
            gen = allm.generate(PROMPT, sampled(3, max_tokens=50))
            await gen.__anext__()
            await gen.aclose()  # leaving early aborts every sample
            allm.check_no_leak()
            return last

    last = asyncio.run(go())
    assert last.finished and [c.token_ids for c in last.outputs] == \
        [c.token_ids for c in out[0].outputs]
