"""The new sampling parameters end to end, through `LLM` on the tiny random Llama.

Oracles: Hugging Face transformers on the same checkpoint (log-probabilities of the generated
tokens, greedy decoding under a repetition penalty), the tokenizer's own decode, and the
documented rules of min_tokens / stop strings / logit_bias checked on the outputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radixkv import LLM, SamplingParams
from tests.engine_fixtures import tiny_llama_dir  # noqa: F401  (fixture)

PROMPTS = [[11, 25, 3000, 412, 77, 901], [40, 41, 42, 43, 44, 45, 46, 47, 48], [500] * 5]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):  # noqa: F811
    with LLM(str(tiny_llama_dir), max_total_tokens=4096) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):  # noqa: F811
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 10, "ignore_eos": True, **kw})


def test_logprobs_match_transformers(llm, hf):
    outs = llm.generate(PROMPTS, greedy(logprobs=3))
    for p, out in zip(PROMPTS, outs, strict=True):
        comp = out.outputs[0]
        ids = torch.tensor([p + comp.token_ids])
        with torch.inference_mode():
            ref = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)  # [T, V]
        assert len(comp.logprobs) == len(comp.token_ids)
        total = 0.0
        for k, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            row = ref[len(p) - 1 + k]
            top = row.topk(3).indices.tolist()
            assert tok in lp and set(top) <= set(lp) and len(lp) <= 4
            assert tok == top[0]  # greedy: the sampled token is the most likely
            for t, v in lp.items():
                assert math.isclose(v, row[t].item(), abs_tol=2e-3), (k, t, v, row[t].item())
            total += lp[tok]
        assert math.isclose(comp.cumulative_logprob, total, rel_tol=1e-9, abs_tol=1e-9)
    assert llm.generate(PROMPTS[:1], greedy())[0].outputs[0].logprobs is None


def test_repetition_penalty_matches_transformers(llm, hf):
    # the random model repeats its last prompt token by a wide logit margin: 2.0 and 4.0 are
    # strong enough to change the answers (checked below), 0.8 rewards the repetition
    for penalty in (2.0, 4.0, 0.8):
        outs = llm.generate(PROMPTS, greedy(repetition_penalty=penalty, max_tokens=12))
        for p, out in zip(PROMPTS, outs, strict=True):
            ids = torch.tensor([p])
            with torch.inference_mode():
                gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                  repetition_penalty=penalty, pad_token_id=0)
            assert out.outputs[0].token_ids == gen[0, len(p):].tolist(), penalty
    plain = llm.generate(PROMPTS, greedy(max_tokens=12))
    penalised = llm.generate(PROMPTS, greedy(max_tokens=12, repetition_penalty=4.0))
    assert all(a.outputs[0].token_ids != b.outputs[0].token_ids
               for a, b in zip(plain, penalised, strict=True))
    llm.check_no_leak()


def reference_greedy(hf, prompt: list[int], n: int, rep: float, freq: float, pres: float
                     ) -> list[int]:
    """Greedy decoding with the penalties applied by hand to transformers' logits."""
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            x = hf(torch.tensor([prompt + out])).logits[0, -1].double().numpy().copy()
        seen = sorted(set(prompt) | set(out))
        x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
        for t in set(out):
            x[t] -= freq * out.count(t) + pres
        out.append(int(np.argmax(x)))
    return out


@pytest.mark.parametrize("rep,freq,pres", [(1.0, 2.0, 0.0), (1.0, 0.0, 2.0), (1.0, 1.5, 1.0),
                                           (1.5, 0.7, 0.3), (1.0, -0.5, -1.0)])
def test_frequency_and_presence_penalties_match_a_reference(llm, hf, rep, freq, pres):
    params = greedy(max_tokens=8, repetition_penalty=rep, frequency_penalty=freq,
                    presence_penalty=pres)
    outs = llm.generate(PROMPTS, params)
    for p, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(hf, p, 8, rep, freq, pres)


def test_logit_bias_forces_and_bans_tokens(llm):
    outs = llm.generate(PROMPTS, greedy(logit_bias={1234: 100.0}, max_tokens=4))
    assert all(o.outputs[0].token_ids == [1234] * 4 for o in outs)
    plain = llm.generate(PROMPTS, greedy(max_tokens=6))
    banned = {t for o in plain for t in o.outputs[0].token_ids}
    outs = llm.generate(PROMPTS, greedy(max_tokens=6, logit_bias={t: -100.0 for t in banned}))
    assert all(not banned & set(o.outputs[0].token_ids) for o in outs)


def test_min_tokens_blocks_eos_and_stop_ids(llm):
    eos = llm.tokenizer.eos_token_id
    # EOS forced by a bias: without min_tokens the request stops at once
    force = {eos: 100.0}
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10,
                                                  logit_bias=force))[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                                                  logit_bias=force))[0].outputs[0]
    assert eos not in out.token_ids[:4] and out.token_ids[4:] == [eos]
    assert out.finish_reason == "stop"
    # a stop token id: blocked for the first min_tokens tokens only
    base = llm.generate(PROMPTS[1], greedy())[0].outputs[0].token_ids
    stop = base[0]
    out = llm.generate(PROMPTS[1], greedy(stop_token_ids=[stop], min_tokens=3))[0].outputs[0]
    assert stop not in out.token_ids[:3]
    assert (out.finish_reason == "stop") == (stop in out.token_ids)
    if stop in out.token_ids:
        assert out.token_ids.index(stop) == len(out.token_ids) - 1 and out.stop_reason == stop
    llm.check_no_leak()


def visible_repeating_prompt(llm) -> tuple[list[int], list[int], str]:
    """A prompt whose greedy answer repeats one visible token (the random model often does)."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        p = rng.integers(10, 5000, 6).tolist()
        ids = llm.generate([p], greedy())[0].outputs[0].token_ids
        piece = llm.tokenizer.decode(ids[:1])
        if len(set(ids)) == 1 and piece.strip() and "\ufffd" not in piece:
            return p, ids, piece
    pytest.skip("no repeating answer found")


def test_stop_strings_wait_for_min_tokens_and_include_stop_str(llm):
    p, ids, piece = visible_repeating_prompt(llm)
    dec = llm.tokenizer.decode
    out = llm.generate([p], greedy(stop=piece))[0].outputs[0]
    assert out.text == "" and out.token_ids == ids[:1] and out.stop_reason == piece
    out = llm.generate([p], greedy(stop=piece, include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == piece and out.finish_reason == "stop"
    # the stop string is looked for from the min_tokens-th token on (vLLM): the text keeps
    # the earlier occurrences
    out = llm.generate([p], greedy(stop=piece, min_tokens=3))[0].outputs[0]
    assert out.token_ids == ids[:3] and out.finish_reason == "stop"
    assert out.text == dec(ids[:2])
    out = llm.generate([p], greedy(stop=piece, min_tokens=10))[0].outputs[0]
    assert out.token_ids == ids and out.text == dec(ids[:9]) and out.finish_reason == "stop"


def test_skip_special_tokens(llm):
    eos = llm.tokenizer.eos_token_id
    for skip, want in ((True, ""), (False, llm.tokenizer.eos_token * 3)):
        out = llm.generate(PROMPTS[0], greedy(max_tokens=3, logit_bias={eos: 100.0},
                                              skip_special_tokens=skip))[0].outputs[0]
        assert out.token_ids == [eos] * 3 and out.text == want


def test_seeded_requests_reproduce_across_threads_and_batches(llm):
    import threading

    params = SamplingParams(temperature=0.9, top_k=40, min_p=0.02, repetition_penalty=1.1,
                            max_tokens=8, seed=99, ignore_eos=True)
    alone = llm.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    res: list = [None] * 6

    def call(i: int) -> None:
        other = SamplingParams(temperature=1.0, max_tokens=8 + i, ignore_eos=True)
        res[i] = llm.generate([PROMPTS[i % 2], PROMPTS[2]], [other, params])[1]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.outputs[0].token_ids == alone for r in res)
    llm.check_no_leak()
