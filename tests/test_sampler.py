"""The batched `Sampler` on hand-made logits over a 5-token vocabulary, and `SamplingParams`.

Oracles: hand-computed penalised logits and log-probabilities (vLLM's definitions, see
`SamplingParams`), a per-row reference of the top-k / top-p / min-p support, sampling
frequencies against the renormalised probabilities, and the same seeded row sampled alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from radixkv import SamplingParams
from radixkv.engine.sampler import Sampler, SampleRow
from radixkv.errors import InvalidRequestError

LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0]  # V = 5
GREEDY = dict(temperature=0.0, max_tokens=8)


def row(prompt=(), output=(), block=(), generator=None, **kw) -> SampleRow:
    params = SamplingParams(**{**GREEDY, **kw})
    return SampleRow(params, generator, list(prompt), list(output), tuple(block))


def processed(rows: list[SampleRow], logits=None) -> list[list[float]]:
    x = torch.tensor([logits or LOGITS] * len(rows))
    return Sampler._processed(x, rows).tolist()


def close(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, abs_tol=1e-6) or x == y for x, y in zip(a, b, strict=True))


# ---- each parameter against a hand-computed case ------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # token 0 in the prompt, token 1 in the output: 2 / 2 = 1, -1 * 2 = -2; others untouched
    [x] = processed([row(prompt=[0], output=[1, 1], repetition_penalty=2.0)])
    assert close(x, [1.0, -2.0, 0.5, 3.0, -2.0])
    # the argmax (token 3, logit 3.0) repeated: under 1.25 it keeps 2.4 > 2.0 and still wins;
    # under 1.6 it drops to 1.875 < 2.0 and token 0 wins
    sampler = Sampler()
    logits = torch.tensor([LOGITS, LOGITS])
    rows = [row(output=[3], repetition_penalty=1.25), row(output=[3], repetition_penalty=1.6)]
    assert sampler(logits, rows).tokens == [3, 0]


def test_frequency_and_presence_penalties_count_output_tokens_only():
    # output [1, 1, 2]: token 1 twice, token 2 once; token 0 only in the prompt (not penalised)
    [x] = processed([row(prompt=[0], output=[1, 1, 2], frequency_penalty=0.5,
                         presence_penalty=0.25)])
    assert close(x, [2.0, -1.0 - 2 * 0.5 - 0.25, 0.5 - 0.5 - 0.25, 3.0, -2.0])
    # negative values reward repetition
    [x] = processed([row(output=[4], frequency_penalty=-1.0, presence_penalty=-2.0)])
    assert close(x, [2.0, -1.0, 0.5, 3.0, -2.0 + 1.0 + 2.0])


def test_all_penalties_together_follow_the_documented_order():
    # repetition first (3 -> 1.5, seen in the output), then frequency and presence
    [x] = processed([row(output=[3, 3], repetition_penalty=2.0, frequency_penalty=0.5,
                         presence_penalty=0.5)])
    assert close(x, [2.0, -1.0, 0.5, 3.0 / 2 - 2 * 0.5 - 0.5, -2.0])


def test_logit_bias_and_min_tokens_block():
    [x] = processed([row(logit_bias={4: 6.0, 0: -1.5})])
    assert close(x, [0.5, -1.0, 0.5, 3.0, 4.0])
    assert Sampler()(torch.tensor([LOGITS]), [row(logit_bias={4: 6.0})]).tokens == [4]
    # the block (EOS / stop ids before min_tokens) masks the argmax: the runner-up wins
    [x] = processed([row(block=[3])])
    assert x[3] == -math.inf and close(x[:3] + x[4:], [2.0, -1.0, 0.5, -2.0])
    assert Sampler()(torch.tensor([LOGITS]), [row(block=[3, 0])]).tokens == [2]


def test_rows_without_edits_keep_their_logits():
    rows = [row(), row(output=[3], repetition_penalty=2.0), row()]
    xs = processed(rows)
    assert close(xs[0], LOGITS) and close(xs[2], LOGITS) and xs[1][3] == 1.5


def test_logprobs_top_k_and_the_sampled_token():
    lse = math.log(sum(math.exp(v) for v in LOGITS))
    ref = [v - lse for v in LOGITS]  # log_softmax by hand
    # greedy picks 3; top 2 are tokens 3 and 0
    res = Sampler()(torch.tensor([LOGITS]), [row(logprobs=2)])
    assert res.tokens == [3]
    assert set(res.logprobs[0]) == {3, 0}
    assert all(math.isclose(res.logprobs[0][t], ref[t], rel_tol=1e-5) for t in (3, 0))
    # a sampled token outside the top k is reported too (logit_bias forces token 4); the
    # logprobs are the model's own, before the bias
    res = Sampler()(torch.tensor([LOGITS, LOGITS]),
                    [row(logprobs=1, logit_bias={4: 100.0}), row(logprobs=0), ])
    assert res.tokens == [4, 3]
    assert set(res.logprobs[0]) == {4, 3}
    assert math.isclose(res.logprobs[0][4], ref[4], rel_tol=1e-5)
    assert res.logprobs[1] == {3: pytest.approx(ref[3], rel=1e-5)}
    # rows that did not ask get None
    res = Sampler()(torch.tensor([LOGITS, LOGITS]), [row(), row(logprobs=3)])
    assert res.logprobs[0] is None and len(res.logprobs[1]) == 3


# ---- sampling: support and frequencies against a per-row reference --------------------------
def reference_probs(logits: list[float], p: SamplingParams) -> list[float]:
    """Per-row reference: softmax(logits / T), then top-k, top-p (keep the smallest top set
    whose mass reaches top_p), min-p (relative to the top token), renormalised."""
    z = [v / p.temperature for v in logits]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    probs = [v / sum(e) for v in e]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order if p.top_k < 1 else order[:p.top_k])
    mass = 0.0
    nucleus = set()
    for i in order:
        if mass >= p.top_p:
            break
        nucleus.add(i)
        mass += probs[i]
    keep &= nucleus
    top = max(probs)
    keep = {i for i in keep if probs[i] >= p.min_p * top}
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.0, top_k=2),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=2.0, min_p=0.3),
    dict(temperature=1.5, top_k=4, top_p=0.9, min_p=0.05),
]


def test_filtered_sampling_matches_the_per_row_reference():
    reps = 4000
    params = [SamplingParams(max_tokens=4, **s) for s in SETTINGS]
    rows = [SampleRow(p, None, [], []) for p in params for _ in range(reps)]  # mixed batch
    tokens = Sampler(seed=7)(torch.tensor([LOGITS] * len(rows)), rows).tokens
    for k, p in enumerate(params):
        got = tokens[k * reps:(k + 1) * reps]
        ref = reference_probs(LOGITS, p)
        freq = [got.count(t) / reps for t in range(5)]
        for t in range(5):
            if ref[t] == 0.0:
                assert freq[t] == 0.0, (p, t, freq)  # filtered out: never drawn
            else:  # 4000 draws: a standard error of at most 0.8%
                assert abs(freq[t] - ref[t]) < 0.035, (p, t, freq, ref)


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=4, seed=11)

    def draws(batch_with: int, steps: int = 30) -> list[int]:
        gen = torch.Generator().manual_seed(11)
        sampler = Sampler(seed=batch_with)
        out = []
        for _ in range(steps):
            others = [SampleRow(SamplingParams(temperature=0.7, max_tokens=4), None, [], [])
                      for _ in range(batch_with)]
            others.insert(batch_with // 2, SampleRow(params, gen, [], []))
            logits = torch.randn(len(others), 5, generator=torch.Generator().manual_seed(3))
            logits[batch_with // 2] = torch.tensor(LOGITS)
            out.append(sampler(logits, others).tokens[batch_with // 2])
        return out

    alone = draws(0)
    assert len(set(alone)) > 1  # really samples
    assert draws(3) == alone and draws(9) == alone


def test_greedy_is_the_argmax_in_a_mixed_batch():
    rows = [row(), SampleRow(SamplingParams(temperature=1.0), None, [], []), row()]
    logits = torch.tensor([LOGITS, LOGITS, [0.0, 0.0, 0.0, 0.0, 9.0]])
    tokens = Sampler()(logits, rows).tokens
    assert tokens[0] == 3 and tokens[2] == 4


# ---- SamplingParams validation ----------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(n=0), dict(n=1.5), dict(temperature=-0.1), dict(temperature=float("inf")),
    dict(temperature=float("nan")), dict(temperature="hot"), dict(top_p=0.0), dict(top_p=1.1),
    dict(min_p=-0.1), dict(min_p=1.5), dict(top_k=0), dict(top_k=-2), dict(top_k=2.0),
    dict(max_tokens=0), dict(max_tokens=True), dict(min_tokens=-1),
    dict(min_tokens=9, max_tokens=8), dict(presence_penalty=2.5), dict(frequency_penalty=-3.0),
    dict(repetition_penalty=0.0), dict(repetition_penalty=11.0),
    dict(repetition_penalty=float("nan")), dict(seed=-1), dict(seed=1.0), dict(logprobs=-1),
    dict(logprobs=21), dict(logprobs=True), dict(stop=""), dict(stop=["ok", ""]),
    dict(stop=[3]), dict(stop_token_ids=[-1]), dict(stop_token_ids=["a"]),
    dict(logit_bias={-1: 1.0}), dict(logit_bias={1: float("inf")}), dict(logit_bias={1: "x"}),
    dict(logit_bias=[(1, 1.0)]), dict(ignore_eos=1), dict(include_stop_str_in_output="yes"),
    dict(skip_special_tokens=None),
])
def test_sampling_params_reject_bad_values(kw):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kw)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", logit_bias={3: 1}, stop_token_ids=None)
    assert p.stop_strings == ("###",) and p.stop_token_ids == [] and p.logit_bias == {3: 1.0}
    assert not p.greedy and not p.has_penalties
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(min_tokens=8, max_tokens=8).min_tokens == 8


def test_top_k_top_p_on_a_large_vocabulary_matches_a_full_sort():
    """Past `CANDIDATES` tokens the filter works on a partial sort and falls back to a full
    one for flat rows: both must keep exactly what a full sort of each row keeps."""
    from radixkv.engine.sampler import CANDIDATES

    v = 3 * CANDIDATES
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([8.0, 8.0, 0.05, 0.05, 4.0, 4.0, 8.0, 0.05, 2.0])[:, None]
    probs = torch.softmax(torch.randn(9, v, generator=gen) * spread, dim=-1)  # peaked / flat
    top_k = [-1, 50, -1, 2000, -1, 3000, 10, -1, 1500]
    top_p = [0.9, 1.0, 0.9, 0.95, 1.0, 0.5, 0.3, 1.0, 0.99]
    got = Sampler._top_k_top_p(probs, top_k, top_p)
    for i in range(9):  # reference: one row at a time, a full descending sort
        sorted_p, order = probs[i].sort(descending=True)
        keep = torch.ones(v, dtype=torch.bool)
        if top_k[i] > 0:
            keep[top_k[i]:] = False
        if top_p[i] < 1.0:  # 1.0 is off (a float cumsum may reach 1 before the tail)
            keep &= (sorted_p.cumsum(0) - sorted_p) < top_p[i]
        want = torch.zeros(v).scatter_(0, order, sorted_p * keep)
        assert torch.equal(got[i] > 0, want > 0), i
        assert torch.allclose(got[i], want), i
    assert torch.equal(got[7], probs[7])  # no filter: untouched


def test_greedy_argmax_is_torch_argmax() -> None:
    """The numpy path for float32 CPU logits keeps torch.argmax's rule: the first maximum,
    NaN counting as the maximum (the oracle: torch.argmax itself)."""
    from radixkv.engine.sampler import greedy_argmax

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=gen)
    x[1, 7] = x[1, 200] = 50.0  # a tie: the first index wins
    x[2, 9] = float("nan")
    x[3, :] = 0.0  # all equal
    x[4, 5] = float("inf")
    for t in (x, x[:, ::2], x[:0], x.double(), x.bfloat16()):
        got = greedy_argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(dim=-1))
