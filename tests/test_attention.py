"""Paged attention (CPU backends) against the naive float64 reference.

Every layout comes from a real `TokenToKVPool` whose free list was shuffled and whose requests
allocated their slots interleaved, so each request's KV is scattered over the pool; the unused
slots hold random values too, so reading a wrong slot shows up as a wrong result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import radixkv.attention as attention
import radixkv.attention.indices as indices_mod
from radixkv.attention import (
    AttentionInputError,
    build_kv_indices,
    cpu_kernels,
    reference,
    torch_backend,
)
from radixkv.errors import InvalidSlotError
from radixkv.memory import ReqToTokenPool, TokenToKVPool

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Layout:
    k: torch.Tensor  # [rows, Hkv, D]
    v: torch.Tensor
    kv_indptr: torch.Tensor  # [B + 1]
    kv_indices: torch.Tensor  # [nnz]
    slots: list[torch.Tensor]  # per request, in position order


def fragmented_layout(kv_lens: list[int], hkv: int, d: int, dtype: torch.dtype, seed: int,
                      extra: int = 37) -> Layout:
    """Slots of each request scattered over a real pool: shuffled free list, interleaved
    allocation (requests take 1-3 slots in turn), random contents everywhere."""
    rng = np.random.default_rng(seed)
    total = sum(kv_lens)
    pool = TokenToKVPool(total + extra, num_layers=1, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    every = pool.alloc(pool.num_slots)
    pool.free(every[torch.from_numpy(rng.permutation(every.numel()))])
    per_req: list[list[torch.Tensor]] = [[] for _ in kv_lens]
    left = list(kv_lens)
    while any(left):
        for b in rng.permutation(len(kv_lens)):
            if left[b]:
                n = int(min(left[b], rng.integers(1, 4)))
                per_req[b].append(pool.alloc(n))
                left[b] -= n
    slots = [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64) for p in per_req]
    gen = torch.Generator().manual_seed(seed)
    k, v = pool.get_kv_buffer(0)
    k.copy_(torch.randn(k.shape, generator=gen).to(dtype))
    v.copy_(torch.randn(v.shape, generator=gen).to(dtype))
    indptr = torch.zeros(len(kv_lens) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor(kv_lens, dtype=torch.int64), 0)
    indices = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
    return Layout(k, v, indptr, indices, slots)


def _qo_indptr(n_new: list[int]) -> torch.Tensor:
    out = torch.zeros(len(n_new) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(n_new, dtype=torch.int64), 0)
    return out


# Each backend under test, called with the public signature (sm_scale optional).
def _public_decode(q, k, v, ip, ix, s=None):  # noqa: ANN001, ANN202
    return attention.decode(q, k, v, ip, ix, s)


def _default(s: float | None, q: torch.Tensor) -> float:
    return s if s is not None else q.shape[-1] ** -0.5


DECODERS: dict[str, Callable[..., torch.Tensor]] = {
    "dispatch": _public_decode,
    "torch": lambda q, k, v, ip, ix, s=None: torch_backend.decode(q, k, v, ip, ix, _default(s, q)),
    "cpp": lambda q, k, v, ip, ix, s=None: cpu_kernels.decode(q, k, v, ip, ix, _default(s, q)),
}
EXTENDERS: dict[str, Callable[..., torch.Tensor]] = {
    "dispatch": lambda q, k, v, qo, ip, ix, s=None: attention.extend(q, k, v, qo, ip, ix, s),
    "torch": lambda q, k, v, qo, ip, ix, s=None: torch_backend.extend(q, k, v, qo, ip, ix,
                                                                     _default(s, q)),
    "cpp": lambda q, k, v, qo, ip, ix, s=None: cpu_kernels.extend(q, k, v, qo, ip, ix,
                                                                 _default(s, q)),
}


def _skip_unbuilt(backend: str) -> None:
    if backend == "cpp" and not cpu_kernels.available():
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler?)")


def _exact_decode(q: torch.Tensor, lay: Layout, scale: float | None) -> torch.Tensor:
    # The oracle sees the same (rounded) input values, widened to float64.
    return reference.decode(q.double(), lay.k.double(), lay.v.double(), lay.kv_indptr,
                            lay.kv_indices, scale)


def _exact_extend(q: torch.Tensor, lay: Layout, qo: torch.Tensor,
                  scale: float | None) -> torch.Tensor:
    return reference.extend(q.double(), lay.k.double(), lay.v.double(), qo, lay.kv_indptr,
                            lay.kv_indices, scale)


def _err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact).abs().max().item() if out.numel() else 0.0


# ---- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", list(DECODERS))
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(backend: str, group: int, d: int, dtype: torch.dtype) -> None:
    _skip_unbuilt(backend)
    hkv = 2
    # Ragged, with length-1 requests and one long enough to be split across threads.
    kv_lens = [1, 37, 700, 1, 129]
    lay = fragmented_layout(kv_lens, hkv, d, dtype, seed=group * 1000 + d)
    q = torch.randn(len(kv_lens), hkv * group, d, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    out = DECODERS[backend](q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices)
    assert out.shape == q.shape and out.dtype == dtype
    assert _err(out, _exact_decode(q, lay, None)) <= TOL[dtype]


@pytest.mark.parametrize("backend", list(DECODERS))
def test_decode_float16_and_custom_scale(backend: str) -> None:
    _skip_unbuilt(backend)
    lay = fragmented_layout([5, 90, 1], hkv=3, d=64, dtype=torch.float16, seed=7)
    q = torch.randn(3, 9, 64).half()
    out = DECODERS[backend](q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, 0.3)
    assert _err(out, _exact_decode(q, lay, 0.3)) <= TOL[torch.float16]


@pytest.mark.parametrize("backend", list(DECODERS))
def test_decode_empty_request_gives_zeros(backend: str) -> None:
    _skip_unbuilt(backend)
    lay = fragmented_layout([4, 0, 3], hkv=1, d=16, dtype=torch.float32, seed=3)
    q = torch.randn(3, 2, 16)
    out = DECODERS[backend](q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices)
    assert torch.equal(out[1], torch.zeros(2, 16))
    assert _err(out, _exact_decode(q, lay, None)) <= 1e-5


def test_decode_handles_odd_head_dim_and_strided_q() -> None:
    # head_dim 20 is not a multiple of the kernel's vector width: the dispatcher must fall back.
    lay = fragmented_layout([3, 17], hkv=2, d=20, dtype=torch.float32, seed=11)
    qkv = torch.randn(2, 3 * 4 * 20)
    q = qkv[:, :4 * 20].view(2, 4, 20)  # a non-contiguous view, as after a fused QKV matmul
    out = attention.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices.to(torch.int32))
    assert _err(out, _exact_decode(q, lay, None)) <= 1e-5
    lay = fragmented_layout([3, 17], hkv=2, d=64, dtype=torch.float32, seed=12)
    qkv = torch.randn(2, 3 * 4 * 64)
    q = qkv[:, 64 * 4 * 2:].view(2, 4, 64)
    out = attention.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices.to(torch.int32))
    assert _err(out, _exact_decode(q, lay, None)) <= 1e-5


def test_shared_prefix_is_read_in_place() -> None:
    # Two requests list the same prefix slots: each output equals attending alone.
    lay = fragmented_layout([50, 3, 4], hkv=3, d=64, dtype=torch.float32, seed=5)
    prefix, tail_a, tail_b = lay.slots
    rows = [torch.cat([prefix, tail_a]), torch.cat([prefix, tail_b])]
    ip = torch.tensor([0, rows[0].numel(), rows[0].numel() + rows[1].numel()])
    q = torch.randn(2, 9, 64)
    both = attention.decode(q, lay.k, lay.v, ip, torch.cat(rows))
    for i in range(2):
        alone = attention.decode(q[i:i + 1], lay.k, lay.v, torch.tensor([0, rows[i].numel()]),
                                 rows[i])
        torch.testing.assert_close(both[i:i + 1], alone, rtol=0, atol=1e-6)


# ---- extend ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", list(EXTENDERS))
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_matches_reference(backend: str, group: int, d: int, dtype: torch.dtype) -> None:
    _skip_unbuilt(backend)
    hkv = 1 if group == 8 else 2
    # (prefix, new): empty prefixes, a single new token, several query tiles and KV blocks,
    # and a request with no new tokens at all.
    shape = [(0, 5), (70, 1), (0, 1), (130, 40), (9, 0), (3, 19)]
    kv_lens = [p + n for p, n in shape]
    lay = fragmented_layout(kv_lens, hkv, d, dtype, seed=group * 7 + d)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(int(qo[-1]), hkv * group, d, generator=torch.Generator().manual_seed(2))
    q = q.to(dtype)
    out = EXTENDERS[backend](q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices)
    assert out.shape == q.shape and out.dtype == dtype
    assert _err(out, _exact_extend(q, lay, qo, None)) <= TOL[dtype]


@pytest.mark.parametrize("backend", list(EXTENDERS))
def test_extend_float16_and_custom_scale(backend: str) -> None:
    _skip_unbuilt(backend)
    shape = [(12, 7), (0, 20)]
    lay = fragmented_layout([p + n for p, n in shape], hkv=3, d=64, dtype=torch.float16, seed=9)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(27, 9, 64).half()
    out = EXTENDERS[backend](q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices, 0.2)
    assert _err(out, _exact_extend(q, lay, qo, 0.2)) <= TOL[torch.float16]


def test_extend_of_one_token_equals_decode() -> None:
    lay = fragmented_layout([1, 40, 300], hkv=3, d=64, dtype=torch.float32, seed=4)
    q = torch.randn(3, 9, 64)
    dec = attention.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices)
    ext = attention.extend(q, lay.k, lay.v, torch.arange(4), lay.kv_indptr, lay.kv_indices)
    torch.testing.assert_close(ext, dec, rtol=0, atol=2e-6)


def test_extend_mixes_fused_and_sdpa_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a low threshold the big requests go to SDPA and the small ones to the fused kernel,
    # in one call writing one output.
    monkeypatch.setattr(attention.dispatch, "_EXTEND_SDPA_WORK", 20_000)
    shape = [(300, 200), (0, 3), (0, 260), (5, 2)]
    lay = fragmented_layout([p + n for p, n in shape], hkv=3, d=64, dtype=torch.float32, seed=8)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(int(qo[-1]), 9, 64)
    out = attention.extend(q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices)
    assert _err(out, _exact_extend(q, lay, qo, None)) <= 1e-5


# ---- the 16-wide (AVX-512) kernels' own edge cases ------------------------------------------
# On an AVX-512 build, head_dim % 16 == 0 runs the 16-wide kernels: queries in tiles of 16, 32
# or 48 (by group size and task count), 16-token score groups, column vectors of 16 with a tail
# of 1-3, and the > 128 head_dim slices of decode; other head_dims run the 8-wide kernels.
@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest):  # noqa: ANN201
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("d", [16, 48, 80, 96, 256])
def test_decode_head_dims_and_groups(group: int, d: int, threads: int) -> None:
    _skip_unbuilt("cpp")
    kv_lens = [1, 15, 16, 17, 63, 64, 65, 300]  # tails of every kind, in 16 and 64 blocks
    lay = fragmented_layout(kv_lens, 2, d, torch.float32, seed=group * 31 + d)
    q = torch.randn(len(kv_lens), 2 * group, d, generator=torch.Generator().manual_seed(d))
    out = cpu_kernels.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, d ** -0.5)
    assert _err(out, _exact_decode(q, lay, None)) <= 1e-5


@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("d", [16, 48, 96])
def test_extend_head_dims_and_groups(group: int, d: int, threads: int) -> None:
    _skip_unbuilt("cpp")
    # (prefix, new): tiles with 1 .. 47 spare rows, blocks cut anywhere by the causal end,
    # long prefixes (several 64-token blocks before the diagonal) and enough tokens for the
    # 32-query tiles of G >= 3.
    shape = [(0, 1), (0, 17), (5, 33), (64, 49), (200, 3), (130, 97), (0, 160), (7, 0)]
    lay = fragmented_layout([p + n for p, n in shape], 2, d, torch.float32, seed=group + d)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(int(qo[-1]), 2 * group, d, generator=torch.Generator().manual_seed(group))
    out = cpu_kernels.extend(q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices, d ** -0.5)
    assert _err(out, _exact_extend(q, lay, qo, None)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_kv_long_context(dtype: torch.dtype, threads: int) -> None:
    # Half K/V widened into the 16-wide kernels' tiles, over several blocks and chunks.
    _skip_unbuilt("cpp")
    shape = [(600, 30), (0, 130), (3000, 1)]
    lay = fragmented_layout([p + n for p, n in shape], 3, 64, dtype, seed=21)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(int(qo[-1]), 9, 64, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = cpu_kernels.extend(q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices, 0.125)
    assert _err(out, _exact_extend(q, lay, qo, 0.125)) <= TOL[dtype]
    qd = q[qo[1:] - 1]  # each request's last token, as a decode step
    out = cpu_kernels.decode(qd, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, 0.125)
    assert _err(out, _exact_decode(qd, lay, 0.125)) <= TOL[dtype]


@pytest.mark.parametrize("extend_dot", ["0", "1"], ids=["outer-product", "dot-product"])
def test_eight_wide_kernels_still_match_the_reference(extend_dot: str) -> None:
    # RADIXKV_CPU_AVX512=0 runs the 8-wide kernels (those of AVX2-only machines) here too;
    # RADIXKV_CPU_EXTEND_DOT=1 the dot-product extend (float K/V otherwise take the 8-wide
    # outer-product one, quantized K/V always the dot-product one).
    _skip_unbuilt("cpp")
    code = (
        "import torch\n"
        "from radixkv.attention import cpu_kernels, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):\n"
        "    for d, grp in ((64, 3), (128, 1), (32, 4)):\n"
        "        k = torch.randn(400, 2, d, generator=g).to(dt)\n"
        "        v = torch.randn(400, 2, d, generator=g).to(dt)\n"
        "        ix = torch.randperm(400, generator=g)[:330]\n"
        "        ip = torch.tensor([0, 30, 330]); qo = torch.tensor([0, 7, 107])\n"
        "        q = torch.randn(107, 2 * grp, d, generator=g).to(dt)\n"
        "        o = cpu_kernels.extend(q, k, v, qo, ip, ix, d ** -0.5)\n"
        "        ref = reference.extend(q.double(), k.double(), v.double(), qo, ip, ix)\n"
        "        assert (o.double() - ref).abs().max() <= tol, (dt, d, grp)\n"
        "        qd = q[:2]\n"
        "        o = cpu_kernels.decode(qd, k, v, ip, ix, d ** -0.5)\n"
        "        ref = reference.decode(qd.double(), k.double(), v.double(), ip, ix)\n"
        "        assert (o.double() - ref).abs().max() <= tol, (dt, d, grp)\n"
        "print('8-wide ok')\n"
    )
    env = dict(os.environ, RADIXKV_CPU_AVX512="0", RADIXKV_CPU_EXTEND_DOT=extend_dot)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "8-wide ok" in res.stdout


# ---- hypothesis-generated shapes -----------------------------------------------------------
_shapes = st.fixed_dictionaries({
    "reqs": st.lists(st.tuples(st.integers(0, 70), st.integers(0, 20)), min_size=1, max_size=5),
    "hkv": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 3, 8]),
    "d": st.sampled_from([8, 16, 24, 32, 64, 128]),
    # None = the default 1/sqrt(D); otherwise a multiple of it (logits of std up to ~1.5, as
    # in real models: much larger ones amplify float32 rounding of the scores beyond 1e-5).
    "scale_mult": st.one_of(st.none(), st.floats(0.05, 1.5)),
    "seed": st.integers(0, 2**16),
    "backend": st.sampled_from(["dispatch", "torch", "cpp"]),
})


def _scale(p: dict) -> float | None:
    return None if p["scale_mult"] is None else p["scale_mult"] * p["d"] ** -0.5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_shapes)
def test_decode_random_shapes(p: dict) -> None:
    _skip_unbuilt(p["backend"])
    kv_lens = [a + b for a, b in p["reqs"]]
    lay = fragmented_layout(kv_lens, p["hkv"], p["d"], torch.float32, seed=p["seed"])
    q = torch.randn(len(kv_lens), p["hkv"] * p["group"], p["d"],
                    generator=torch.Generator().manual_seed(p["seed"]))
    out = DECODERS[p["backend"]](q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, _scale(p))
    assert _err(out, _exact_decode(q, lay, _scale(p))) <= 1e-5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_shapes)
def test_extend_random_shapes(p: dict) -> None:
    _skip_unbuilt(p["backend"])
    kv_lens = [a + b for a, b in p["reqs"]]
    lay = fragmented_layout(kv_lens, p["hkv"], p["d"], torch.float32, seed=p["seed"])
    qo = _qo_indptr([b for _, b in p["reqs"]])
    q = torch.randn(int(qo[-1]), p["hkv"] * p["group"], p["d"],
                    generator=torch.Generator().manual_seed(p["seed"]))
    out = EXTENDERS[p["backend"]](q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices,
                                  _scale(p))
    assert _err(out, _exact_extend(q, lay, qo, _scale(p))) <= 1e-5


# ---- bad input -------------------------------------------------------------------------------
def _small() -> tuple[torch.Tensor, Layout]:
    lay = fragmented_layout([3, 4], hkv=2, d=16, dtype=torch.float32, seed=0)
    return torch.randn(2, 4, 16), lay


@pytest.mark.parametrize("backend_env", ["cpp", "torch"])
def test_bad_slots_and_indptr_raise_typed_errors(backend_env: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if backend_env == "torch":
        monkeypatch.setattr(cpu_kernels, "supports", lambda q, k: False)
    else:
        _skip_unbuilt("cpp")
    q, lay = _small()
    rows = lay.k.shape[0]
    bad = lay.kv_indices.clone()
    bad[2] = rows  # one past the end of the buffers
    with pytest.raises(InvalidSlotError):
        attention.decode(q, lay.k, lay.v, lay.kv_indptr, bad)
    bad[2] = -1
    with pytest.raises(InvalidSlotError):
        attention.decode(q, lay.k, lay.v, lay.kv_indptr, bad)
    with pytest.raises(InvalidSlotError):  # decreasing
        attention.decode(q, lay.k, lay.v, torch.tensor([0, 5, 4]), lay.kv_indices)
    with pytest.raises(InvalidSlotError):  # past the end of kv_indices
        attention.decode(q, lay.k, lay.v, torch.tensor([0, 3, 8]), lay.kv_indices)
    qo_bad = torch.tensor([0, 1, 3])  # ends at 3 but q has 2 rows
    with pytest.raises(InvalidSlotError):
        attention.extend(q, lay.k, lay.v, qo_bad, lay.kv_indptr, lay.kv_indices)
    qe = torch.randn(5, 4, 16)
    with pytest.raises(InvalidSlotError):  # request 0: 4 new tokens but only 3 slots
        attention.extend(qe, lay.k, lay.v, torch.tensor([0, 4, 5]), lay.kv_indptr,
                         lay.kv_indices)


def test_inconsistent_shapes_raise_attention_input_error() -> None:
    q, lay = _small()
    ip, ix = lay.kv_indptr, lay.kv_indices
    cases = [
        (q[0], lay.k, lay.v, ip, ix),  # 2-D q
        (torch.randn(2, 3, 16), lay.k, lay.v, ip, ix),  # 3 query heads over 2 KV heads
        (torch.randn(2, 4, 8), lay.k, lay.v, ip, ix),  # head_dim mismatch
        (q.double(), lay.k, lay.v, ip, ix),  # unsupported dtype
        (q.half(), lay.k, lay.v, ip, ix),  # q and buffers differ in dtype
        (q, lay.k, lay.v[:, :1], ip, ix),  # K and V differ
        (q, lay.k, lay.v, ip.float(), ix),  # float indptr
        (q, lay.k, lay.v, torch.tensor([0, 7]), ix),  # 1 request but 2 queries
    ]
    for args in cases:
        with pytest.raises(AttentionInputError):
            attention.decode(*args)
    with pytest.raises(AttentionInputError):
        attention.extend(q, lay.k, lay.v, torch.tensor([0, 2]), ip, ix)  # B mismatch


# ---- build_kv_indices ---------------------------------------------------------------------
def test_build_kv_indices_matches_loop_over_req_to_token() -> None:
    req_pool = ReqToTokenPool(max_requests=6, max_context_len=50)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        row = req_pool.alloc()
        req_pool.write(row, 0, torch.randint(1, 1000, (50,), generator=gen))
    rows = torch.tensor([4, 0, 2, 2, 5])
    lens = torch.tensor([3, 0, 50, 1, 17])
    table = req_pool.req_to_token
    expect = torch.cat([table[r, :n].long() for r, n in zip(rows, lens, strict=True)])
    # the CPU (numpy) path and the torch-ops path (what CUDA runs) against the loop
    for build in (build_kv_indices, indices_mod._build_torch):
        indptr, indices = build(req_pool.req_to_token, rows, lens)
        assert indptr.dtype == indices.dtype == torch.int64
        assert indptr.tolist() == [0, 3, 3, 53, 54, 71]
        assert torch.equal(indices, expect)
        indptr, indices = build(req_pool.req_to_token, rows[2:3], lens[4:])  # one request
        assert indptr.tolist() == [0, 17] and torch.equal(indices, table[2, :17].long())


def test_build_kv_indices_feeds_decode() -> None:
    lay = fragmented_layout([5, 9], hkv=1, d=8, dtype=torch.float32, seed=1)
    req_pool = ReqToTokenPool(max_requests=2, max_context_len=16)
    for slots in lay.slots:
        req_pool.write(req_pool.alloc(), 0, slots)
    ip, ix = build_kv_indices(req_pool.req_to_token, torch.tensor([0, 1]), torch.tensor([5, 9]))
    assert torch.equal(ip, lay.kv_indptr) and torch.equal(ix, lay.kv_indices)


def test_build_kv_indices_edge_cases_and_errors() -> None:
    table = torch.arange(12, dtype=torch.int32).view(3, 4)
    ip, ix = build_kv_indices(table, torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, dtype=torch.int64))
    assert ip.tolist() == [0] and ix.numel() == 0
    ip, ix = build_kv_indices(table, torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert ip.tolist() == [0, 0, 0] and ix.numel() == 0
    with pytest.raises(InvalidSlotError):
        build_kv_indices(table, torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(InvalidSlotError):
        build_kv_indices(table, torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(InvalidSlotError):
        build_kv_indices(table, torch.tensor([0]), torch.tensor([-1]))
    with pytest.raises(AttentionInputError):
        build_kv_indices(table, torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(AttentionInputError):
        build_kv_indices(table, torch.tensor([0.0]), torch.tensor([1]))


# ---- fallback when the kernels cannot be built ---------------------------------------------
def test_falls_back_to_torch_when_the_compiler_fails(tmp_path: os.PathLike) -> None:
    code = (
        "import torch, radixkv.attention as A\n"
        "from radixkv.attention import cpu_kernels, reference\n"
        "assert not cpu_kernels.available()\n"
        "k = torch.randn(9, 1, 16); v = torch.randn(9, 1, 16); q = torch.randn(1, 2, 16)\n"
        "ip = torch.tensor([0, 4]); ix = torch.tensor([8, 1, 5, 2])\n"
        "err = (A.decode(q, k, v, ip, ix) - reference.decode(q, k, v, ip, ix)).abs().max()\n"
        "assert err < 1e-5, err\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, CXX="/bin/false", RADIXKV_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fallback ok" in res.stdout
