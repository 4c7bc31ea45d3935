"""Quantized KV cache: fidelity on the default model and decode speed. Prints; asserts nothing.

Fidelity (SmolLM2-135M, float32 weights), each KV dtype against the float32 KV cache:
  - greedy agreement: P prompts x T generated tokens through `LLM.generate` (engine, batched
    decode): identical outputs, and the first divergence position of the others; a divergence
    where the float32 run's top-2 logits were within 2e-3 counts as a near tie (agreement);
  - logit error: max and mean |logit - float32 logit| over the generated positions, teacher
    forced (each prompt + the float32 continuation, one prefill on a pool of that KV dtype);
  - perplexity of a fixed text (this repo's README) with each KV dtype.
  `--zero-point` adds a simulated asymmetric int8 (scale = (max - min) / 255 and a zero point,
  stored dequantized in a float32 pool): the measurement behind kv_quant's symmetric choice.

Speed (fused CPU kernels; SmolLM2 shapes: Hq 9, Hkv 3, D 64, 30 layers): one decode step (a
call per layer) at batch 8 x 2048 tokens of scattered slots, float32 vs int8 vs fp8 KV, with
the GB/s of KV bytes read (codes and scales); and batch 1 x 64 tokens, where fixed costs
dominate, with and without the K/V write (set_kv quantizes).

Run: `.venv/bin/python bench/kv_quant.py [--quick] [--zero-point] [--skip-speed]`.
`--quick` (8 prompts x 16 tokens, 256-token perplexity, 3 timing iterations) takes about a
minute on a loaded 2-core machine; the full run (32 x 32, 1024 tokens) a few minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import radixkv.attention as attention
from radixkv import LLM, SamplingParams
from radixkv.memory import TokenToKVPool, kv_quant
from radixkv.model import LoadedModel, build_forward_context, forward_context, load_model

NEAR_TIE = 2e-3
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "the violin", "bees", "glass",
          "winter", "trains", "coffee", "maps", "whales", "clocks", "paper", "deserts",
          "comets", "tea", "bridges", "owls", "salt", "lighthouses", "cotton", "tides",
          "honey", "kites", "copper", "forests", "rain", "castles", "the alphabet", "ice"]
TEMPLATES = ["Tell me three facts about {}.", "Write a short poem about {}.",
             "Explain {} to a child.", "What is the history of {}?"]


class AsymInt8Pool(TokenToKVPool):
    """float32 pool whose set_kv stores asymmetric-int8 round trips (simulation only)."""

    def set_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        super().set_kv(layer, slots, _asym_round_trip(k), _asym_round_trip(v))


def _asym_round_trip(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    s = ((hi - lo) / 255).clamp_min(1e-30)
    z = torch.round(-lo / s) - 128  # code of 0.0 in [-128, 127]
    q = (torch.round(xf / s) + z).clamp_(-128, 127)
    return ((q - z) * s).to(x.dtype)


def make_pool(lm: LoadedModel, n: int, kind: str) -> TokenToKVPool:
    cfg = lm.config
    shape = (n, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if kind == "int8-asym (sim)":
        return AsymInt8Pool(*shape, dtype=lm.dtype)
    return TokenToKVPool(*shape, dtype=lm.dtype, kv_cache_dtype=kind)


def logits_all(lm: LoadedModel, kind: str, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one prefill over `ids` with a fresh pool of `kind`."""
    pool = make_pool(lm, len(ids), kind)
    ctx = build_forward_context(pool, [pool.alloc(len(ids))], logits="all")
    with torch.inference_mode(), forward_context(ctx):
        return lm.model(torch.tensor(ids, dtype=torch.int64))


def prompts(lm: LoadedModel, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)])
        out.append(lm.apply_chat_template([{"role": "user", "content": text}]))
    return out


def fidelity(lm: LoadedModel, kinds: list[str], n_prompts: int, n_tokens: int,
             ppl_tokens: int) -> None:
    ps = prompts(lm, n_prompts)
    greedy = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    gen: dict[str, list[list[int]]] = {}
    for kind in ["auto", *[k for k in kinds if k != "int8-asym (sim)"]]:
        llm = LLM(lm, max_total_tokens=8192, kv_cache_dtype=kind)
        gen[kind] = [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]
    # Teacher-forced logits of prompt + float32 continuation: rows p-1 .. p+T-2 predict the T
    # generated tokens.
    ref_logits = []
    for p, out in zip(ps, gen["auto"], strict=True):
        ref_logits.append(logits_all(lm, "auto", p + out[:-1])[len(p) - 1:])
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text_ids = lm.tokenizer(text)["input_ids"][:ppl_tokens]
    print(f"\nfidelity: {n_prompts} prompts x {n_tokens} greedy tokens vs float32 KV; "
          f"perplexity of README.md's first {len(text_ids)} tokens")
    print(f"  {'KV dtype':<17} {'B/token':>8} {'identical':>10} {'+near ties':>11} "
          f"{'first divergences':<26} {'max |dlogit|':>12} {'mean |dlogit|':>13} {'ppl':>8}")
    for kind in ["auto", *kinds]:
        ident = ties = 0
        first: list[int] = []
        if kind in gen:
            for i, (a, b) in enumerate(zip(gen["auto"], gen[kind], strict=True)):
                if a == b:
                    ident += 1
                    continue
                pos = next(j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
                first.append(pos)
                top2 = torch.topk(ref_logits[i][pos], 2).values
                ties += int(float(top2[0] - top2[1]) < NEAR_TIE)
            agree = f"{ident}/{n_prompts}"
            with_ties = f"{ident + ties}/{n_prompts}"
        else:
            agree = with_ties = "-"
        errs = []
        for p, out, ref in zip(ps, gen["auto"], ref_logits, strict=True):
            lg = logits_all(lm, kind, p + out[:-1])[len(p) - 1:]
            errs.append((lg - ref).abs())
        err = torch.cat([e.reshape(-1) for e in errs])
        lg = logits_all(lm, kind, text_ids)
        nll = torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(text_ids[1:]))
        bpt = make_pool(lm, 1, kind).bytes_per_token()
        if kind == "int8-asym (sim)":  # what it would take: int8 codes, a scale and a zero point
            cfg = lm.config
            bpt = make_pool(lm, 1, "int8").bytes_per_token() + \
                2 * cfg.num_layers * cfg.num_kv_heads * kv_quant.SCALE_BYTES
        name = "float32 (auto)" if kind == "auto" else kind
        div = ",".join(map(str, sorted(first))) if first else "-"
        print(f"  {name:<17} {bpt:>8} {agree:>10} {with_ties:>11} {div:<26} "
              f"{err.max().item():>12.4f} {err.mean().item():>13.5f} {math.exp(nll):>8.4f}")


def reconstruction(lm: LoadedModel, n_tokens: int) -> None:
    """Relative RMS error of K and V rows, all layers, symmetric vs asymmetric int8 and fp8."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = lm.tokenizer(text)["input_ids"][:n_tokens]
    pool = make_pool(lm, len(ids), "auto")
    slots = pool.alloc(len(ids))
    ctx = build_forward_context(pool, [slots], logits="last")
    with torch.inference_mode(), forward_context(ctx):
        lm.model(torch.tensor(ids, dtype=torch.int64))
    f8 = kv_quant.fp8_dtype()
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "int8 symmetric": lambda x: kv_quant.dequantize(*kv_quant.quantize(x, torch.int8)),
        "int8 asymmetric": _asym_round_trip,
    }
    if f8 is not None:
        fns["fp8_e4m3"] = lambda x: kv_quant.dequantize(*kv_quant.quantize(x, f8))
    sq = {n: [0.0, 0.0] for n in fns}
    den = [0.0, 0.0]
    for layer in range(pool.num_layers):
        for i, x in enumerate(pool.get_kv(layer, slots)):
            den[i] += float(x.pow(2).sum())
            for n, f in fns.items():
                sq[n][i] += float((f(x) - x).pow(2).sum())
    print(f"\nK/V row reconstruction, relative RMS error over {pool.num_layers} layers x "
          f"{len(ids)} tokens of README.md:")
    for n, (ek, ev) in sq.items():
        print(f"  {n:<17} K {math.sqrt(ek / den[0]):.5f}   V {math.sqrt(ev / den[1]):.5f}")


def timed(fn: Callable[[], object], iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def speed(iters: int, batch: int, context: int) -> None:
    hq, hkv, d, layers = 9, 3, 64, 30
    scale = d ** -0.5
    torch.manual_seed(0)
    names = ["auto", "int8"] + (["fp8_e4m3"] if kv_quant.fp8_dtype() is not None else [])
    n_tok = batch * context
    print(f"\ndecode speed: batch {batch} x {context} tokens (scattered slots), Hq={hq} "
          f"Hkv={hkv} D={d}, {layers} layers, one decode call per layer")
    base = None
    for name in names:
        pool = TokenToKVPool(n_tok, layers, hkv, d, kv_cache_dtype=name)
        slots = pool.alloc(n_tok)[torch.randperm(n_tok)]
        kr, vr = torch.randn(4096, hkv, d), torch.randn(4096, hkv, d)
        for layer in range(layers):  # fill by chunks (set_kv quantizes), one random chunk reused
            for c in range(0, n_tok, 4096):
                s = slots[c:c + 4096]
                pool.set_kv(layer, s, kr[:s.numel()], vr[:s.numel()])
        indptr = torch.arange(batch + 1, dtype=torch.int64) * context
        q = torch.randn(batch, hq, d)

        def step(pool: TokenToKVPool = pool, slots: torch.Tensor = slots,
                 indptr: torch.Tensor = indptr, q: torch.Tensor = q) -> None:
            for layer in range(layers):
                k, v = pool.get_kv_buffer(layer)
                ks, vs = pool.get_kv_scales(layer)
                attention.decode(q, k, v, indptr, slots, scale, k_scale=ks, v_scale=vs)

        t = timed(step, iters)
        nbytes = pool.bytes_per_token() * n_tok
        base = base or t
        label = "float32" if name == "auto" else name
        print(f"  {label:<10} {t * 1e3:8.2f} ms/step  {nbytes / t / 1e9:6.1f} GB/s of KV "
              f"({nbytes / 1e6:.0f} MB/step)  time {t / base:5.2f}x float32")
        del pool

    small = 64
    print(f"\nbatch 1 x {small} tokens (fixed costs dominate), {layers} layers; ms per step, "
          "ratio vs float32 in the same run")
    fns = {name: small_step(name, small, layers, hq, hkv, d) for name in names}
    # Interleaved rounds: on a shared machine the load drifts, so each dtype is timed in every
    # round and the medians are compared.
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for _ in range(iters * 3):
        for name, (read, write) in fns.items():
            times[name][0].append(timed(read, 1))
            times[name][1].append(timed(write, 1))
    rows = {n: (statistics.median(a) / 20, statistics.median(b) / 20)
            for n, (a, b) in times.items()}
    b_read, b_write = rows["auto"]
    for name, (t_read, t_write) in rows.items():
        label = "float32" if name == "auto" else name
        print(f"  {label:<10} attention {t_read * 1e3:6.3f} ms ({t_read / b_read:5.2f}x)   "
              f"set_kv + attention {t_write * 1e3:6.3f} ms ({t_write / b_write:5.2f}x)")


def small_step(name: str, small: int, layers: int, hq: int, hkv: int,
               d: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two callables running 20 decode steps at batch 1: without, and with the new token's
    set_kv before each layer's attention."""
    pool = TokenToKVPool(small + 1, layers, hkv, d, kv_cache_dtype=name)
    slots = pool.alloc(small + 1)
    for layer in range(layers):
        pool.set_kv(layer, slots, torch.randn(small + 1, hkv, d), torch.randn(small + 1, hkv, d))
    ip = torch.tensor([0, small])
    q1 = torch.randn(1, hq, d)
    knew, vnew = torch.randn(1, hkv, d), torch.randn(1, hkv, d)
    last, ctx = slots[small:], slots[:small]
    scale = d ** -0.5
    reps = 20

    def steps(write: bool) -> None:
        for _ in range(reps):
            for layer in range(layers):
                if write:
                    pool.set_kv(layer, last, knew, vnew)
                k, v = pool.get_kv_buffer(layer)
                ks, vs = pool.get_kv_scales(layer)
                attention.decode(q1, k, v, ip, ctx, scale, k_scale=ks, v_scale=vs)

    return (lambda: steps(False)), (lambda: steps(True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens, 256-token ppl")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--zero-point", action="store_true",
                    help="also measure simulated asymmetric int8 (the zero-point decision)")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    n_prompts = args.prompts or (8 if args.quick else 32)
    n_tokens = args.tokens or (16 if args.quick else 32)
    iters = args.iters or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}, fused CPU kernels "
          f"{'yes' if attention.cpu_kernels.available() else 'no'}")
    if not args.skip_fidelity:
        lm = load_model(None, dtype="float32")
        kinds = ["int8"] + (["fp8_e4m3"] if kv_quant.fp8_dtype() is not None else [])
        if args.zero_point:
            kinds.append("int8-asym (sim)")
            reconstruction(lm, 256 if args.quick else 1024)
        fidelity(lm, kinds, n_prompts, n_tokens, 256 if args.quick else 1024)
    if not args.skip_speed:
        speed(iters, 8, 2048)


if __name__ == "__main__":
    main()
