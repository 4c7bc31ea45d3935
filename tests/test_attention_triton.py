"""The Triton kernels run on CPU tensors under the Triton interpreter, against the reference.

TRITON_INTERPRET=1 is set before triton is first imported here and for the duration of this
module's tests; it is restored afterwards so other tests in the same process are unaffected.
`triton_backend` decorates its kernels lazily, per interpreter mode, so the outcome does not
depend on whether another module imported triton first. Shapes are small: the interpreter runs
each program instance in numpy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_PREV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton cannot be imported, so its kernels cannot be "
                                         "interpreted")
    from radixkv.attention import triton_backend
finally:
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV

from test_attention import TOL, Layout, _err, _qo_indptr, fragmented_layout  # noqa: E402

from radixkv.attention import reference  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpret() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    yield
    mp.undo()


def _exact_decode(q: torch.Tensor, lay: Layout, scale: float) -> torch.Tensor:
    return reference.decode(q.double(), lay.k.double(), lay.v.double(), lay.kv_indptr,
                            lay.kv_indices, scale)


def _exact_extend(q: torch.Tensor, lay: Layout, qo: torch.Tensor, scale: float) -> torch.Tensor:
    return reference.extend(q.double(), lay.k.double(), lay.v.double(), qo, lay.kv_indptr,
                            lay.kv_indices, scale)


def test_kernels_are_interpreted() -> None:
    assert triton_backend._interpreting()
    kern = triton_backend._kernels()
    assert type(kern.stage1).__name__ == "InterpretedFunction"


@pytest.mark.parametrize(("group", "hkv", "d", "dtype"), [
    (1, 2, 64, torch.float32),
    (3, 2, 64, torch.bfloat16),
    (8, 1, 128, torch.float32),
    (3, 1, 128, torch.float16),
])
def test_decode_matches_reference(group: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    kv_lens = [1, 70, 0, 23]
    lay = fragmented_layout(kv_lens, hkv, d, dtype, seed=group + d)
    q = torch.randn(len(kv_lens), hkv * group, d).to(dtype)
    scale = d ** -0.5
    out = triton_backend.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out[2].float(), torch.zeros_like(out[2].float()))  # empty request
    assert _err(out, _exact_decode(q, lay, scale)) <= TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_combine(num_splits: int) -> None:
    # More splits than some requests have tokens: empty splits must weigh nothing.
    lay = fragmented_layout([2, 50, 7], hkv=1, d=32, dtype=torch.float32, seed=num_splits)
    q = torch.randn(3, 3, 32)
    out = triton_backend.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, 0.2,
                                num_splits=num_splits)
    assert _err(out, _exact_decode(q, lay, 0.2)) <= 1e-5


@pytest.mark.parametrize(("group", "hkv", "d", "dtype"), [
    (1, 2, 64, torch.float32),
    (3, 1, 64, torch.bfloat16),
    (8, 1, 128, torch.float32),
    (3, 1, 128, torch.float16),
])
def test_extend_matches_reference(group: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    # (prefix, new): empty prefix, one new token, a request with several query tiles, and one
    # with no new tokens.
    shape = [(0, 3), (40, 1), (5, 0), (9, 35)]
    lay = fragmented_layout([p + n for p, n in shape], hkv, d, dtype, seed=group * 3 + d)
    qo = _qo_indptr([n for _, n in shape])
    q = torch.randn(int(qo[-1]), hkv * group, d).to(dtype)
    scale = d ** -0.5
    out = triton_backend.extend(q, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert _err(out, _exact_extend(q, lay, qo, scale)) <= TOL[dtype]


def test_int32_indices_and_strided_q() -> None:
    lay = fragmented_layout([6, 11], hkv=2, d=16, dtype=torch.float32, seed=5)
    qkv = torch.randn(2, 3 * 4 * 16)
    q = qkv[:, :64].view(2, 4, 16)
    out = triton_backend.decode(q, lay.k, lay.v, lay.kv_indptr.int(), lay.kv_indices.int(), 0.25)
    assert _err(out, _exact_decode(q, lay, 0.25)) <= 1e-5
    qo = torch.tensor([0, 2, 5], dtype=torch.int32)
    qe = torch.randn(5, 4 * 3, 16)[:, ::3]  # strided heads
    out = triton_backend.extend(qe, lay.k, lay.v, qo, lay.kv_indptr.int(), lay.kv_indices.int(),
                                0.25)
    assert _err(out, _exact_extend(qe, lay, qo.long(), 0.25)) <= 1e-5


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({
    "reqs": st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=3),
    "hkv": st.integers(1, 2),
    "group": st.sampled_from([1, 3]),
    "d": st.sampled_from([8, 24, 64]),
    "seed": st.integers(0, 2**16),
}))
def test_random_shapes(p: dict) -> None:
    kv_lens = [a + b for a, b in p["reqs"]]
    lay = fragmented_layout(kv_lens, p["hkv"], p["d"], torch.float32, seed=p["seed"])
    gen = torch.Generator().manual_seed(p["seed"])
    scale = p["d"] ** -0.5
    q = torch.randn(len(kv_lens), p["hkv"] * p["group"], p["d"], generator=gen)
    out = triton_backend.decode(q, lay.k, lay.v, lay.kv_indptr, lay.kv_indices, scale)
    assert _err(out, _exact_decode(q, lay, scale)) <= 1e-5
    qo = _qo_indptr([b for _, b in p["reqs"]])
    qe = torch.randn(int(qo[-1]), p["hkv"] * p["group"], p["d"], generator=gen)
    out = triton_backend.extend(qe, lay.k, lay.v, qo, lay.kv_indptr, lay.kv_indices, scale)
    assert _err(out, _exact_extend(qe, lay, qo, scale)) <= 1e-5


@pytest.mark.parametrize(("name", "group", "hkv", "d", "dtype"), [
    ("int8", 1, 2, 64, torch.float32),
    ("int8", 3, 1, 128, torch.bfloat16),
    ("fp8_e4m3", 8, 1, 64, torch.float32),
    ("fp8_e4m3", 3, 2, 64, torch.float16),
])
def test_quantized_kv_matches_reference(name: str, group: int, hkv: int, d: int,
                                        dtype: torch.dtype) -> None:
    # int8 / fp8 codes with per-(slot, head) scales, read and dequantized inside the kernels.
    from test_kv_quant import F8, quant_layout
    if name == "fp8_e4m3" and F8 is None:
        pytest.skip("this torch has no float8_e4m3fn")
    shape = [(0, 3), (40, 1), (5, 0), (9, 20)]
    lay, k, v, ks, vs = quant_layout([p + n for p, n in shape], hkv, d, name, seed=group + d)
    scale = d ** -0.5
    q = torch.randn(len(shape), hkv * group, d).to(dtype)
    out = triton_backend.decode(q, k, v, lay.kv_indptr, lay.kv_indices, scale, k_scale=ks,
                                v_scale=vs)
    exact = reference.decode(q.double(), k, v, lay.kv_indptr, lay.kv_indices, scale,
                             k_scale=ks, v_scale=vs)
    # Outputs reach ~10 here (V rows of varied magnitude): the half-dtype bound is relative.
    assert out.dtype == dtype and _err(out, exact) <= TOL[dtype] * max(1.0, exact.abs().max())
    qo = _qo_indptr([n for _, n in shape])
    qe = torch.randn(int(qo[-1]), hkv * group, d).to(dtype)
    out = triton_backend.extend(qe, k, v, qo, lay.kv_indptr, lay.kv_indices, scale, k_scale=ks,
                                v_scale=vs)
    exact = reference.extend(qe.double(), k, v, qo, lay.kv_indptr, lay.kv_indices, scale,
                             k_scale=ks, v_scale=vs)
    assert _err(out, exact) <= TOL[dtype] * max(1.0, exact.abs().max())
