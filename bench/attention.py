"""Paged attention benchmark (CPU): prints figures, asserts nothing.

Decode: a batch of B requests with T tokens of context each, over L layers (one step = one call
per layer, as the model runs it), on the default model's shapes (9 query / 3 KV heads, head_dim
64, 30 layers, float32). Rows:
  (a) paged kernel, slots scattered at random over the pool (a shuffled free list);
  (b) paged kernel, slots allocated in order;
  (c) contiguous baselines without paging on [B, H, T, D] tensors: matmul-softmax-matmul with q
      viewed [B, Hkv, G, D], and SDPA with enable_gqa;
  and the pure-torch fallback backend on (a)'s slots.
Effective GB/s counts the K and V bytes each step must read once (B * T * Hkv * D * 2 * elem * L).
Extend: B requests of N new tokens over P cached tokens, timed on a few layers and scaled to L.
Also: the machine's copy bandwidth, and per-call overhead at batch 1.

Run: `.venv/bin/python bench/attention.py [--batch 8 --context 2048 --iters 5 ...]`.
Timings are medians; on a shared machine they move with the load (printed at the top).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import radixkv.attention as attention
from radixkv.attention import cpu_kernels, torch_backend
from radixkv.memory import TokenToKVPool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median seconds per call of `fn` over `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def copy_bandwidth(mb: int = 512) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read GB/s of a reduction) on `mb` MiB buffers."""
    src = torch.ones(mb << 18)  # mb MiB of float32
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    t_copy = timed(lambda: dst.copy_(src), 5)
    t_read = timed(lambda: src.sum(), 5)
    return 2 * nbytes / t_copy / 1e9, nbytes / t_read / 1e9


def row(name: str, seconds: float, amount: float, unit: str, base: float | None = None) -> None:
    """One result line: ms per step, `amount` per second in `unit` (GB or GFLOP), ratio."""
    ratio = f"{seconds / base:6.2f}x" if base else "      "
    print(f"  {name:<48} {seconds * 1e3:9.2f} ms/step {amount / seconds / 1e9:7.1f} {unit}/s"
          f"  {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--extend-new", type=int, default=512)
    ap.add_argument("--extend-prefix", type=int, default=1536)
    ap.add_argument("--extend-layers", type=int, default=3,
                    help="layers actually timed for extend (the result is scaled to --layers)")
    ap.add_argument("--skip-extend", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, steadier than wall time on a loaded machine "
                         "(use with --threads 1; with more threads it sums them)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    bsz, ctx, hq, hkv, d, layers = (args.batch, args.context, args.q_heads, args.kv_heads,
                                    args.head_dim, args.layers)
    g = hq // hkv
    elem = torch.empty((), dtype=dtype).element_size()
    scale = d ** -0.5
    torch.manual_seed(0)

    t0 = time.perf_counter()
    fused = cpu_kernels.available()
    build_s = time.perf_counter() - t0
    print(f"threads={torch.get_num_threads()} clock={args.clock} "
          f"load average={os.getloadavg()[0]:.2f} "
          f"dtype={args.dtype} fused CPU kernels={'yes' if fused else 'no (torch fallback)'} "
          f"(ready in {build_s:.2f}s)")
    copy_gbs, read_gbs = copy_bandwidth()
    print(f"memory: copy {copy_gbs:.1f} GB/s (read + write bytes), read {read_gbs:.1f} GB/s "
          "(sum of a 512 MiB tensor)")

    # ---- decode --------------------------------------------------------------------------
    n_tok = bsz * ctx
    pool = TokenToKVPool(n_tok, num_layers=layers, num_kv_heads=hkv, head_dim=d, dtype=dtype)
    for buf in pool.k_buffers + pool.v_buffers:
        buf.uniform_(-1, 1)
    in_order = pool.alloc(n_tok)  # a fresh pool hands out 1, 2, 3, ...
    pool.free(in_order[torch.randperm(n_tok)])  # shuffled free list
    scattered = pool.alloc(n_tok)
    indptr = torch.arange(bsz + 1, dtype=torch.int64) * ctx
    q = torch.randn(bsz, hq, d).to(dtype)
    kv_bytes = 2 * n_tok * hkv * d * elem * layers

    def paged(indices: torch.Tensor, fn: Callable[..., torch.Tensor] = attention.decode
              ) -> Callable[[], None]:
        def step() -> None:
            for layer in range(layers):
                k, v = pool.get_kv_buffer(layer)
                fn(q, k, v, indptr, indices, scale)
        return step

    kc = [torch.empty(bsz, hkv, ctx, d, dtype=dtype).uniform_(-1, 1) for _ in range(layers)]
    vc = [torch.empty(bsz, hkv, ctx, d, dtype=dtype).uniform_(-1, 1) for _ in range(layers)]

    def contiguous_mm() -> None:
        qg = q.view(bsz, hkv, g, d)
        for layer in range(layers):
            s = torch.matmul(qg, kc[layer].transpose(-1, -2)) * scale  # [B, Hkv, G, T]
            torch.matmul(torch.softmax(s, dim=-1), vc[layer])

    def contiguous_sdpa() -> None:
        q4 = q[:, :, None]
        for layer in range(layers):
            F.scaled_dot_product_attention(q4, kc[layer], vc[layer], scale=scale,
                                           enable_gqa=True)

    print(f"\ndecode: batch {bsz} x context {ctx}, Hq={hq} Hkv={hkv} D={d}, {layers} layers "
          f"({kv_bytes / 1e6:.0f} MB of KV per step); GB/s of KV read, ratio vs the best (c)")
    t_mm = timed(contiguous_mm, args.iters)
    t_sdpa = timed(contiguous_sdpa, args.iters)
    base = min(t_mm, t_sdpa)
    t_a = timed(paged(scattered), args.iters)
    t_b = timed(paged(in_order), args.iters)
    row("(a) paged, scattered slots", t_a, kv_bytes, "GB", base)
    row("(b) paged, slots in order", t_b, kv_bytes, "GB", base)
    row("(c) contiguous matmul-softmax-matmul", t_mm, kv_bytes, "GB", base)
    row("(c) contiguous SDPA (enable_gqa)", t_sdpa, kv_bytes, "GB", base)
    t_fb = timed(paged(scattered, torch_backend.decode), max(1, args.iters // 2))
    row("    torch fallback backend, scattered slots", t_fb, kv_bytes, "GB", base)

    # Per-call overhead: tiny contexts, where fixed costs dominate.
    small_ip = torch.tensor([0, 16])
    small_ix = scattered[:16]
    q1 = q[:1]
    k0, v0 = pool.get_kv_buffer(0)
    t_call = timed(lambda: [attention.decode(q1, k0, v0, small_ip, small_ix, scale)
                            for _ in range(100)], 5) / 100
    print(f"  per-call time, batch 1 x 16 tokens: {t_call * 1e6:.1f} us "
          f"({t_call * layers * 1e3:.2f} ms per {layers}-layer step)")
    del kc, vc

    if args.skip_extend:
        return
    # ---- extend --------------------------------------------------------------------------
    n_new, prefix = args.extend_new, args.extend_prefix
    kv_len = n_new + prefix
    ext_layers = min(args.extend_layers, layers)
    if kv_len != ctx:  # reuse the decode pool's slots when the totals match
        pool.clear()
        scattered = pool.alloc(bsz * kv_len) if bsz * kv_len <= pool.num_slots else None
        if scattered is None:
            print("extend: pool too small for these shapes; rerun with a larger --context")
            return
        scattered = scattered[torch.randperm(scattered.numel())]
        in_order = torch.arange(1, bsz * kv_len + 1)
    ext_indptr = torch.arange(bsz + 1, dtype=torch.int64) * kv_len
    qo_indptr = torch.arange(bsz + 1, dtype=torch.int64) * n_new
    qe = torch.randn(bsz * n_new, hq, d).to(dtype)
    flops = 4 * bsz * hq * d * (n_new * prefix + n_new * (n_new + 1) / 2) * layers

    def paged_ext(indices: torch.Tensor, fn: Callable[..., torch.Tensor] = attention.extend
                  ) -> Callable[[], None]:
        def run() -> None:
            for layer in range(ext_layers):
                k, v = pool.get_kv_buffer(layer)
                fn(qe, k, v, qo_indptr, ext_indptr, indices, scale)
        return run

    kc = [torch.empty(bsz, hkv, kv_len, d, dtype=dtype).uniform_(-1, 1)
          for _ in range(ext_layers)]
    vc = [torch.empty(bsz, hkv, kv_len, d, dtype=dtype).uniform_(-1, 1)
          for _ in range(ext_layers)]
    q4 = qe.view(bsz, n_new, hq, d).transpose(1, 2)  # [B, Hq, N, D]
    qpos = torch.arange(prefix, kv_len)
    mask = torch.arange(kv_len)[None, :] <= qpos[:, None]  # [N, T], bottom-right causal

    def contiguous_ext() -> None:
        for layer in range(ext_layers):
            F.scaled_dot_product_attention(q4, kc[layer], vc[layer], attn_mask=mask, scale=scale,
                                           enable_gqa=True)

    per = layers / ext_layers
    iters = max(1, args.iters // 2)
    print(f"\nextend: {bsz} requests x {n_new} new tokens over {prefix}-token cached prefixes, "
          f"{ext_layers} layers timed, scaled to {layers} "
          f"({flops / 1e9:.0f} GFLOP per step); ratio vs (c)")
    t_c = timed(contiguous_ext, iters) * per
    t_a = timed(paged_ext(scattered), iters) * per
    t_b = timed(paged_ext(in_order), iters) * per
    row("(a) paged, scattered slots", t_a, flops, "GFLOP", t_c)
    row("(b) paged, slots in order", t_b, flops, "GFLOP", t_c)
    row("(c) contiguous SDPA (bottom-right causal mask)", t_c, flops, "GFLOP", t_c)
    if fused:
        t_f = timed(paged_ext(scattered, cpu_kernels.extend), iters) * per
        row("    fused kernel for every request, scattered", t_f, flops, "GFLOP", t_c)
    if fused and cpu_kernels.outer_extend(d):
        print("  (a)/(b) use the dispatcher: float K/V run the outer-product fused kernel at every"
              " size (RADIXKV_CPU_EXTEND_DOT=1: the dot-product one, with SDPA for big requests)")
    else:
        print("  (a)/(b) use the dispatcher: requests this big run SDPA on K/V gathered per"
              " request; smaller ones the fused kernel")


if __name__ == "__main__":
    main()
