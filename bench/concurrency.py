"""Many callers on one engine: threads and asyncio tasks against one batched call, host overhead
per step, and a soak of short requests. Prints figures and ratios measured in this one run;
asserts nothing.

1. 16 prompts (a shared system prompt + distinct questions, greedy, EOS ignored, equal work):
   one `generate()` call of all 16; 16 threads each calling `generate` with one; 16 asyncio
   tasks on an `AsyncLLM`; 16 sequential calls. Goals: threads and tasks >= 0.9 of the one
   call's throughput (the callers really batch), and >= 4x the sequential calls. The prefix cache
   is cleared before each run so every run computes the same.
2. Host time per step outside the model forward (scheduler, sampler, detokenizer, output
   handling) at batch 1 and 32, as a share of the step (`Engine.step_time`; greedy), and the
   sampler alone under penalties and top-p.
3. Soak: 20,000 requests of 2 new tokens from 16 threads through the loop: RSS growth after a
   warm-up (goal < 50 MB), and whether every slot is free or cached afterwards. On a tiny random
   Llama by default (`--soak-model default` for the real one).

Run: `.venv/bin/python bench/concurrency.py [--model PATH|tiny] [--soak 20000] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import torch

from radixkv import LLM, AsyncLLM, SamplingParams

SYSTEM = ("You are the help desk of a city library. Answer in one or two short sentences. The "
          "library opens at nine and closes at eight; members borrow up to twelve items.")


def tiny_model_dir(root: Path) -> str:
    """A 2-layer random Llama with the default model's tokenizer (fast; for the soak)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixkv.model import load_tokenizer

    tok = load_tokenizer(None)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def questions(llm: LLM, n: int) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"Question {i}: can I borrow "
                                      f"{i + 2} books on day {i * 5 % 28 + 1}?"}])
            for i in range(n)]


def clear_cache(llm: LLM) -> None:
    llm.loop.call(lambda engine: engine.cache.reset()).result()  # on the loop thread, idle


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_one_call(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    return timed(lambda: llm.generate(prompts, params))


def run_threads(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    barrier = threading.Barrier(len(prompts) + 1)
    done: list[int] = []

    def caller(p: list[int]) -> None:
        barrier.wait()
        done.append(len(llm.generate([p], params)[0].outputs[0].token_ids))

    threads = [threading.Thread(target=caller, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    assert len(done) == len(prompts)
    return wall


def run_tasks(allm: AsyncLLM, prompts: list[list[int]], params: SamplingParams) -> float:
    async def one(p: list[int]) -> None:
        async for _ in allm.generate(p, params):
            pass

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - start

    return asyncio.run(main())


def run_sequential(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    return timed(lambda: [llm.generate([p], params) for p in prompts])


def step_split(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    """Per-step times (ms) of one generate call of `prompts`, from the engine's counters."""
    def snap() -> tuple[dict[str, float], int]:
        return llm.loop.call(lambda e: (dict(e.step_time), e.counters["steps"])).result()

    (t0, s0) = snap()
    llm.generate(prompts, params)
    (t1, s1) = snap()
    steps = max(s1 - s0, 1)
    out = {k: 1000 * (t1[k] - t0[k]) / steps for k in t1}
    total = sum(out.values())
    out["host_share"] = (total - out["forward"]) / total if total else 0.0
    out["steps"] = steps
    return out


def sampler_ms(vocab: int) -> None:
    """The sampler alone on [B, vocab] logits (peaked, like a model's), per settings."""
    from radixkv.engine.sampler import Sampler, SampleRow

    sampler = Sampler()
    settings = {"greedy": SamplingParams(temperature=0.0),
                "greedy + repetition 1.2": SamplingParams(temperature=0.0,
                                                          repetition_penalty=1.2),
                "T 0.7, top_p 0.9, rep 1.2": SamplingParams(temperature=0.7, top_p=0.9,
                                                            repetition_penalty=1.2)}
    g = torch.Generator().manual_seed(0)
    for b in (1, 32):
        x = torch.randn(b, vocab, generator=g) * 4
        cells = []
        for name, p in settings.items():
            rows = [SampleRow(p, None, list(range(100, 164)), list(range(200, 232)))
                    for _ in range(b)]
            sampler(x, rows)
            n = 10
            start = time.perf_counter()
            for _ in range(n):
                sampler(x, rows)
            cells.append(f"{name} {1000 * (time.perf_counter() - start) / n:.2f} ms")
        print(f"  sampler alone, batch {b:<2} (64 prompt + 32 output tokens per row): "
              + ", ".join(cells))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def soak(llm: LLM, n: int, threads: int = 16) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    vocab = llm.lm.config.vocab_size

    def batch_of(count: int, seed: int) -> None:
        per = count // threads

        def worker(k: int) -> None:
            g = torch.Generator().manual_seed(seed * 1000 + k)
            for _ in range(per):
                p = torch.randint(10, vocab - 10, (8,), generator=g).tolist()
                llm.generate([p], params)

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    batch_of(max(n // 20, threads), seed=0)  # warm up: allocator, tree filled to the pool
    rss0 = rss_mb()
    start = time.perf_counter()
    marks = []
    for part in range(4):
        batch_of(n // 4, seed=part + 1)
        marks.append(rss_mb())
    wall = time.perf_counter() - start
    stats = llm.cache_stats()
    try:
        llm.check_no_leak()
        leak = "no slot leaked (free + cached == pool)"
    except AssertionError as exc:
        leak = f"LEAK: {exc}"
    left = llm.loop.call(lambda e: len(e.requests)).result()
    print(f"\nsoak: {n} requests x 2 new tokens from {threads} threads in {wall:.1f} s "
          f"({n / wall:.0f} req/s)")
    print(f"  RSS {rss0:.1f} MB after warm-up, then {', '.join(f'{m:.1f}' for m in marks)} MB "
          f"after each quarter: growth {marks[-1] - rss0:+.1f} MB (goal < 50 MB)")
    print(f"  {leak}; requests left in the engine {left}, unfinished {llm.num_unfinished()}, "
          f"tree {stats['tree_tokens']} of {stats['pool_size']} slots, evicted "
          f"{stats['evicted_tokens']} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path, 'tiny' (random 2-layer Llama) "
                                                  "or omitted for the default model")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak", type=int, default=20_000, help="soak requests (0: skip)")
    ap.add_argument("--soak-model", default="tiny", help="'tiny' or 'default'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    tiny = None

    def tiny_path() -> str:
        nonlocal tiny
        if tiny is None:
            tiny = tiny_model_dir(Path(tmp.name))
        return tiny

    model = tiny_path() if args.model == "tiny" else args.model
    llm = LLM(model, max_total_tokens=16_384)
    allm = AsyncLLM(llm.lm, max_total_tokens=16_384)  # same weights, its own engine and loop
    prompts = questions(llm, args.prompts)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    n_tok = len(prompts) * args.max_tokens
    print(f"model {llm.model_name}, {len(prompts)} prompts of {len(prompts[0])}-"
          f"{max(len(p) for p in prompts)} tokens x {args.max_tokens} new tokens, torch threads "
          f"{torch.get_num_threads()}")
    run_one_call(llm, prompts[:2], params)  # warm up both engines
    run_tasks(allm, prompts[:2], params)
    rows = {}
    for name, fn in (("one generate() call", lambda: run_one_call(llm, prompts, params)),
                     (f"{len(prompts)} threads", lambda: run_threads(llm, prompts, params)),
                     (f"{len(prompts)} asyncio tasks", lambda: run_tasks(allm, prompts, params)),
                     (f"{len(prompts)} sequential calls",
                      lambda: run_sequential(llm, prompts, params))):
        clear_cache(llm)
        clear_cache(allm)
        rows[name] = fn()
    base = rows["one generate() call"]
    seq = rows[f"{len(prompts)} sequential calls"]
    print(f"\n{'callers':<24} {'wall s':>7} {'out tok/s':>9} {'vs one call':>11} "
          f"{'vs sequential':>13}")
    for name, wall in rows.items():
        print(f"{name:<24} {wall:>7.2f} {n_tok / wall:>9.1f} {base / wall:>10.2f}x "
              f"{seq / wall:>12.2f}x")
    print("goals: threads and tasks >= 0.90x one call, >= 4x sequential")

    print("\nper step (ms): schedule, forward, sample, process (detokenize, outputs); host share "
          "= time outside the forward")
    many = questions(llm, 32)
    for label, ps in (("batch 1", prompts[:1]), ("batch 32", many)):
        clear_cache(llm)
        s = step_split(llm, ps, params)
        print(f"  {label:<9} {s['schedule']:.2f} + {s['forward']:.2f} + {s['sample']:.2f} + "
              f"{s['process']:.2f} ms over {s['steps']} steps: host share {s['host_share']:.1%}")
    sampler_ms(llm.lm.config.vocab_size)
    llm.check_no_leak()
    allm.check_no_leak()
    llm.shutdown()
    allm.shutdown()

    if args.soak:
        soak_llm = LLM(tiny_path() if args.soak_model == "tiny" else None,
                       max_total_tokens=4096)
        print(f"\nsoak model: {soak_llm.model_name}")
        soak(soak_llm, args.soak)
        soak_llm.shutdown()
    tmp.cleanup()


if __name__ == "__main__":
    main()
