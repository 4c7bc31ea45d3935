"""Prefill tokens/s and decode step time of the default model (radixkv.model), fp32 and bf16.

Drives the model directly through `build_forward_context` (no engine, no cache), so the figures are
the model + paged attention alone. Prints figures; asserts nothing.
Run: `.venv/bin/python bench/model.py [--dtypes float32,bfloat16] [--prefill 512] [--ctx 256]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from radixkv.memory import TokenToKVPool
from radixkv.model import build_forward_context, forward_context, load_model


def run(lm, pool, new, cached=None):
    ctx = build_forward_context(pool, [s for s in new], cached, logits="last")
    ids = torch.randint(100, 40000, (int(ctx.positions.numel()),))
    with torch.inference_mode(), forward_context(ctx):
        return lm.model(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=256, help="context length before decode")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for dt in a.dtypes.split(","):
        t0 = time.perf_counter()
        lm = load_model(None, dtype=dt)
        t_load = time.perf_counter() - t0
        c = lm.config
        pool = TokenToKVPool(
            a.prefill * (a.repeats + 1) + 9 * (a.ctx + a.steps) + 64,
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            dtype=lm.dtype,
        )
        run(lm, pool, [pool.alloc(16)])  # warm-up (kernel build, rope table)
        times, cpus = [], []
        for _ in range(a.repeats):
            s = pool.alloc(a.prefill)
            t0 = time.perf_counter()
            c0 = time.process_time()
            run(lm, pool, [s])
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        best = min(times)
        print(
            f"{dt}: load {t_load:.1f}s; prefill {a.prefill} tok: best wall {best:.3f}s "
            f"= {a.prefill / best:.0f} tok/s (median {statistics.median(times):.3f}s; "
            f"process CPU {min(cpus):.2f}s)"
        )
        for bs in (1, 8):
            ctxs = []
            for _ in range(bs):
                s = pool.alloc(a.ctx)
                run(lm, pool, [s])
                ctxs.append(s)
            steps, cpus = [], []
            for _ in range(a.steps):
                new = [pool.alloc(1) for _ in range(bs)]
                t0 = time.perf_counter()
                c0 = time.process_time()
                run(lm, pool, new, ctxs)
                steps.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                ctxs = [torch.cat([x, n]) for x, n in zip(ctxs, new, strict=True)]
            print(
                f"{dt}: decode batch {bs} (context {a.ctx}): median step "
                f"{1000 * statistics.median(steps):.1f} ms, best {1000 * min(steps):.1f} ms "
                f"({bs / statistics.median(steps):.1f} tok/s; process CPU best "
                f"{1000 * min(cpus):.1f} ms)"
            )
        if a.profile:
            from torch.profiler import profile

            s = pool.alloc(a.prefill)
            with profile() as p:
                run(lm, pool, [s])
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
            new = [pool.alloc(1) for _ in range(8)]
            with profile() as p:
                run(lm, pool, new, ctxs)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
