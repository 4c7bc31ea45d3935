"""Engine behaviour on a tiny random Llama: scheduling, caching, memory pressure, errors.

The oracle for every output is the same engine run alone, unconstrained and without the cache
(plus, in test_engine_reference.py, Hugging Face transformers on the real model).
"""

from __future__ import annotations

import numpy as np
import pytest

from radixkv import LLM, SamplingParams
from radixkv.errors import ConfigError, InvalidRequestError
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_llm(path, **kw) -> LLM:
    kw.setdefault("max_total_tokens", 4096)
    return LLM(str(path), **kw)


def workload(seed: int = 0) -> list[list[int]]:
    """Heavy sharing: a shared system prompt, multi-turn extensions, branches, and strangers."""
    rng = np.random.default_rng(seed)
    vocab = 2000
    system = rng.integers(10, vocab, 40).tolist()
    prompts = [system + rng.integers(10, vocab, n).tolist() for n in (5, 9, 3, 17)]
    turn1 = prompts[0] + rng.integers(10, vocab, 12).tolist()
    prompts += [turn1, turn1 + rng.integers(10, vocab, 7).tolist()]  # multi-turn
    root = rng.integers(10, vocab, 30).tolist()
    branches = [root + rng.integers(10, vocab, 6).tolist() for _ in range(3)]
    prompts += branches + [b + rng.integers(10, vocab, 4).tolist() for b in branches[:2]]
    prompts += [rng.integers(10, vocab, n).tolist() for n in (1, 2, 25)]
    return prompts


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir):  # noqa: F811
    """Each prompt alone, cache off, plenty of memory."""
    llm = make_llm(tiny_llama_dir, enable_prefix_cache=False)
    outs = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in workload()]
    llm.engine.check_no_leak()
    return outs


def run_all(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    llm.engine.check_no_leak()
    return outs


@pytest.mark.parametrize("policy", ["lpm", "fcfs", "dfs-weight"])
def test_cache_on_equals_cache_off_batched(tiny_llama_dir, oracle, policy):  # noqa: F811
    llm = make_llm(tiny_llama_dir, schedule_policy=policy)
    assert run_all(llm, workload()) == oracle
    assert llm.cache_stats()["cached_tokens"] > 0


def test_sequential_turns_hit_the_cache(tiny_llama_dir, oracle):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    prompts = workload()
    outs = []
    for p in prompts:
        out = llm.generate([p], GREEDY)[0]
        outs.append(out.outputs[0].token_ids)
    assert outs == oracle
    # turn 2 (index 5) extends turn 1 (index 4), which extended prompt 0: the whole of turn 1
    # is cached when turn 2 arrives
    again = llm.generate([prompts[5]], GREEDY)[0]
    assert again.num_cached_tokens == len(prompts[5]) - 1
    llm.engine.check_no_leak()


@pytest.mark.parametrize("chunk", [8, 33])
def test_chunked_prefill_matches(tiny_llama_dir, oracle, chunk):  # noqa: F811
    llm = make_llm(tiny_llama_dir, chunked_prefill_size=chunk)
    assert run_all(llm, workload()) == oracle


def test_page_size_two_matches(tiny_llama_dir, oracle):  # noqa: F811
    llm = make_llm(tiny_llama_dir, page_size=2)
    assert run_all(llm, workload()) == oracle


@pytest.mark.parametrize("pool", [80, 150])
def test_memory_pressure_completes_identically(tiny_llama_dir, oracle, pool):  # noqa: F811
    # The longest request needs 71 + 12 slots; the workload's total is ~600.
    llm = make_llm(tiny_llama_dir, max_total_tokens=pool, max_running_requests=8)
    assert run_all(llm, workload()) == oracle
    stats = llm.cache_stats()
    assert stats["evicted_tokens"] > 0
    if pool == 80:
        assert stats["preemptions"] > 0


def test_bad_input_raises_before_touching_memory(tiny_llama_dir):  # noqa: F811
    llm = make_llm(tiny_llama_dir, max_total_tokens=200)
    vocab = llm.lm.config.vocab_size
    free_before = llm.engine.kv_pool.available_size()
    bad_calls = [
        lambda: llm.generate([[]], GREEDY),
        lambda: llm.generate("", GREEDY),
        lambda: llm.generate([[1, 2, vocab]], GREEDY),
        lambda: llm.generate([[1, -3]], GREEDY),
        lambda: llm.generate([[1] * 1020], GREEDY),  # beyond the context of 1024
        lambda: llm.generate([[1] * 190], GREEDY),  # beyond the pool of 200
        lambda: llm.generate([[1, 2]], SamplingParams(max_tokens=0)),
        lambda: llm.generate([[1, 2]], SamplingParams(temperature=float("nan"))),
        lambda: llm.generate([[1, 2]], SamplingParams(temperature=-1.0)),
        lambda: llm.generate([[1, 2]], SamplingParams(top_p=0.0)),
        lambda: llm.generate([[1, 2], [3]], [GREEDY]),
        lambda: llm.generate([[1, 2], [1, 2, vocab + 5]], GREEDY),  # one bad prompt: none run
        lambda: llm.chat([{"role": "user"}, "nope"]),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidRequestError):
            call()
        assert llm.engine.kv_pool.available_size() == free_before
        assert not llm.engine.has_work()
    with pytest.raises(ConfigError):  # a configuration mistake, not a request's
        make_llm(tiny_llama_dir, schedule_policy="random")
    out = llm.generate([[5, 6, 7]], GREEDY)[0]  # still serving
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"
    llm.engine.check_no_leak()


def test_abort_frees_everything_and_engine_keeps_serving(tiny_llama_dir, oracle):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    prompts = workload()
    eng = llm.engine
    reqs = [eng.add_request(p, GREEDY) for p in prompts[:6]]
    for _ in range(3):
        eng.step()
    assert eng.abort(reqs[0].rid) and eng.abort(reqs[5].rid)
    assert not eng.abort(reqs[0].rid)  # already finished
    assert not eng.abort("no-such-request")
    eng.run_until_done(reqs[1:5])
    assert reqs[0].finish_reason == "abort"
    for i in range(1, 5):
        assert reqs[i].output_ids == oracle[i]
    eng.check_no_leak()
    assert run_all(llm, prompts) == oracle


def test_stream_pieces_join_to_generate_text(tiny_llama_dir):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    prompt = workload()[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate([prompt], params)[0].outputs[0].text
    pieces = list(llm.stream(prompt, params))
    assert "".join(pieces) == full
    assert all(p and "\ufffd" not in p for p in pieces)
    # closing a stream early aborts the request and frees its slots
    gen = llm.stream(prompt, params)
    next(gen)
    gen.close()
    llm.engine.check_no_leak()


def test_stop_tokens_stop_strings_and_max_tokens(tiny_llama_dir):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    prompt = workload()[1]
    base = llm.generate([prompt], GREEDY)[0]
    ids = base.outputs[0].token_ids
    stop_id = ids[4]
    first = ids.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ids[:first + 1] and out.outputs[0].finish_reason == "stop"
    text = base.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop=stop,
                                                    ignore_eos=True))[0]
        assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].text == text[:text.find(stop)]
    assert base.outputs[0].finish_reason == "length" and len(ids) == 12
    llm.engine.check_no_leak()


def test_seeded_sampling_is_reproducible_across_batches(tiny_llama_dir):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    prompts = workload()[:5]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=10, seed=1234,
                            ignore_eos=True)
    alone = llm.generate([prompts[2]], params)[0].outputs[0].token_ids
    batched = llm.generate(prompts, params)[2].outputs[0].token_ids
    assert alone == batched
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = llm.generate([prompts[2]] * 4, unseeded)
    assert len({tuple(o.outputs[0].token_ids) for o in a}) > 1  # really samples
    llm.engine.check_no_leak()


def test_namespaces_do_not_share(tiny_llama_dir, oracle):  # noqa: F811
    llm = make_llm(tiny_llama_dir)
    p = workload()[0]
    llm.generate([p], GREEDY, namespace="tenant-a")
    out_b = llm.generate([p], GREEDY, namespace="tenant-b")[0]
    out_a = llm.generate([p], GREEDY, namespace="tenant-a")[0]
    assert out_b.num_cached_tokens == 0
    assert out_a.num_cached_tokens == len(p) - 1
    assert out_a.outputs[0].token_ids == out_b.outputs[0].token_ids == oracle[0]
    llm.engine.check_no_leak()


@pytest.mark.parametrize("chunk", [8, 512])
def test_token_accounting_is_conserved(tiny_llama_dir, chunk):  # noqa: F811
    """Cache off: every prompt token is prefill work once, every later token one decode."""
    llm = make_llm(tiny_llama_dir, chunked_prefill_size=chunk, enable_prefix_cache=False)
    prompts = workload()
    llm.generate(prompts, GREEDY)
    stats = llm.cache_stats()
    assert stats["prefill_tokens_computed"] == sum(len(p) for p in prompts)
    assert stats["decode_tokens"] == (GREEDY.max_tokens - 1) * len(prompts)
