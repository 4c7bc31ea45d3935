"""KV tiers on the default model: what a shared store saves a second engine process.

    .venv/bin/python bench/tiers.py [--questions 8] [--threads 1]

Prints (never asserts), each figure measured in this run:
1. Two engine processes sharing one redis-server (started here on a free loopback port): A serves
   a shared-system-prompt chat workload with write-through; B, a separate process, then serves
   the same system prompt with new questions, with the store vs without: TTFT and prefill tokens.
2. A warm restart from disk: a process computes, stops; a new one on the same directory.
3. Fetch bandwidth (bytes read / fetch time) against recomputing the same tokens.
4. Memory pressure: a pool too small for the workload's prefixes, with a store (evicted prefixes
   come back from it) vs without (they are recomputed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.redis_fixtures import RedisProcess  # noqa: E402  (a real redis-server, stopped after)

SYSTEM = ("You are the help desk of the Riverside public library. " * 40).strip()

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    from radixkv import LLM, SamplingParams
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    llm = LLM(None, max_total_tokens=cfg["pool"], kv_store=cfg["store"],
              kv_store_write_through=cfg["write_through"])
    params = SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"])
    convs = [[{"role": "system", "content": cfg["system"]},
              {"role": "user", "content": q}] for q in cfg["questions"]]
    t0 = time.perf_counter()
    ttfts = []
    for c in convs:  # one at a time: TTFT is the prefill of what the caches miss
        out = llm.chat(c, params)[0]
        ttfts.append(out.metrics.ttft)
    wall = time.perf_counter() - t0
    if cfg["store"]:
        llm.loop.call(lambda e: e.tier.flush(30)).result()
    st = llm.cache_stats()
    llm.shutdown()
    print(json.dumps({"wall": wall, "ttft_mean": sum(ttfts) / len(ttfts), "ttft_first": ttfts[0],
                      "prefill": st["prefill_tokens_computed"], "prompt": st["prompt_tokens"],
                      "tier_hit": st.get("tier_hit_tokens", 0),
                      "bytes_read": st.get("tier_bytes_read", 0),
                      "fetch_s": st.get("tier_fetch_seconds", 0.0),
                      "written": st.get("tier_written_pages", 0),
                      "errors": st.get("tier_errors", {})}))
""")


def run_process(store: str | None, questions: list[str], *, pool: int, threads: int,
                write_through: bool, max_tokens: int) -> dict:
    cfg = {"store": store, "questions": questions, "pool": pool, "threads": threads,
           "write_through": write_through, "max_tokens": max_tokens, "system": SYSTEM}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, r: dict) -> str:
    return (f"| {name} | {r['ttft_first'] * 1000:.0f} | {r['ttft_mean'] * 1000:.0f} | "
            f"{r['prefill']} / {r['prompt']} | {r['tier_hit']} | {r['wall']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    qs = [f"Question {i}: what are the opening hours on day {i}?" for i in range(args.questions)]
    qs_b = [f"Visitor {i}: can I renew book number {100 + i}?" for i in range(args.questions)]
    kw = {"threads": args.threads, "max_tokens": args.max_tokens}
    print(f"# KV tiers, default model, {len(qs)} questions after a shared system prompt, "
          f"{args.threads} thread(s), one request at a time\n")
    header = ("| run | TTFT first ms | TTFT mean ms | prefill / prompt tokens | tier hit tokens "
              "| wall s |\n|---|---|---|---|---|---|")

    if shutil.which("redis-server") is None:
        print("redis-server not installed: skipping the shared-store runs")
    else:
        server = RedisProcess().start()
        try:
            a = run_process(server.url, qs, pool=65536, write_through=True, **kw)
            b_with = run_process(server.url, qs_b, pool=65536, write_through=False, **kw)
            b_without = run_process(None, qs_b, pool=65536, write_through=False, **kw)
        finally:
            server.kill()
        print("## 1. Two processes sharing Redis (B after A)\n")
        print(header)
        print(row("A (computes, write-through)", a))
        print(row("B with the shared store", b_with))
        print(row("B without a store", b_without))
        print(f"\nB's first TTFT with / without the store: "
              f"{b_with['ttft_first'] / b_without['ttft_first']:.2f}x; prefill tokens "
              f"{b_with['prefill']} vs {b_without['prefill']}")
        if b_with["fetch_s"]:
            bw = b_with["bytes_read"] / b_with["fetch_s"]
            recompute_s = b_without["ttft_first"] - b_with["ttft_first"]
            print(f"\n## 3. Fetch vs recompute\n\nfetched {b_with['bytes_read'] / 1e6:.1f} MB in "
                  f"{b_with['fetch_s'] * 1000:.0f} ms = {bw / 1e9:.2f} GB/s; the same "
                  f"{b_with['tier_hit']} tokens' share of B's first TTFT without the store: "
                  f"{recompute_s * 1000:.0f} ms more")

    disk = tempfile.mkdtemp(prefix="radixkv-tier-")
    try:
        url = f"file://{disk}"
        first = run_process(url, qs, pool=65536, write_through=True, **kw)
        restart = run_process(url, qs, pool=65536, write_through=False, **kw)
        cold = run_process(None, qs, pool=65536, write_through=False, **kw)
        print("\n## 2. Warm restart from disk\n")
        print(header)
        print(row("first process (computes)", first))
        print(row("restarted, same directory", restart))
        print(row("restarted, no store", cold))
        # 4: a pool that holds one conversation's prefix but not the workload's churn
        pressure = 1200
        t0 = time.perf_counter()
        with_store = run_process(f"file://{disk}/pressure", qs + qs_b + qs, pool=pressure,
                                 write_through=False, **kw)
        without = run_process(None, qs + qs_b + qs, pool=pressure, write_through=False, **kw)
        print(f"\n## 4. Memory pressure (pool of {pressure} tokens, {3 * len(qs)} requests)\n")
        print(header)
        print(row("write-back to disk, fetch on miss", with_store))
        print(row("recompute (no store)", without))
        print(f"\n(all runs: {time.perf_counter() - t0:.0f} s for section 4)")
    finally:
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
