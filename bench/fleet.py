"""A fleet of radixkv workers behind sglang-router: does cache-aware routing keep the hit rate of
one big engine? Prints figures; asserts nothing.

Trace: `--tenants` tenants, each with its own long system prompt; each tenant has
`--conversations` conversations of `--turns` turns (every turn resends the whole history plus a
new question; `--max-tokens` new tokens per answer, EOS ignored). All conversations are shuffled
into one queue and `--clients` clients take them one at a time, so turns of different tenants
arrive interleaved. Every request streams through the official `openai` client.

Configurations, each on fresh processes: for N in `--workers` (default 2 and 3) workers of
`--pool` KV tokens and 1 thread each, the router's round_robin and cache_aware policies, each
without and with a shared Redis tier (a private redis-server; workers write every prompt's pages
through to it, so any worker can fetch what another computed); and, as the bound, one engine
whose pool is the N workers' pools together (N threads). Pools are small on purpose: one worker
cannot hold every tenant's prefixes, the fleet together can.

Per configuration: prompt-token hit rate (sum cached_tokens / sum prompt_tokens, from the usage
objects; tier hits count as cached), the part of it served from the Redis tier (the workers'
radixkv_kv_tier_hits_tokens), TTFT p50 / p99 (request sent -> first content chunk), output
tokens/s and requests/s over the wall time, and how the requests split over the workers.

    nice -n 10 flock /work/helpers/bench.lock .venv/bin/python bench/fleet.py [--quick]

`--quick` runs a tiny random model (seconds per configuration); the default is the default
model (SmolLM2-135M-Instruct GGUF, found by radixkv's default model resolution).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from radixkv.serving.fleet import LOCAL_REDIS, Fleet  # noqa: E402
from radixkv.serving.launcher import ServerProcess  # noqa: E402

MODEL_NAME = "fleet-bench"
TOPICS = ["a lighthouse archive", "a mountain railway", "a seed library", "a ferry company",
          "a clock museum", "a night market", "a glass workshop", "a river observatory",
          "a tram depot", "a botanical garden", "a puppet theatre", "a salt mine"]


@dataclass(slots=True)
class Sample:
    ttft: float
    tokens: int
    prompt_tokens: int
    cached_tokens: int


def system_prompt(tenant: int, words: int) -> str:
    topic = TOPICS[tenant % len(TOPICS)]
    base = (f"You are the front desk assistant of {topic} (tenant {tenant}). Visitors ask about "
            f"opening hours, tickets, guided tours, accessibility, lost property and the cafe. "
            f"Tickets for {topic} cost {5 + tenant} euros, children under {6 + tenant % 5} "
            f"enter free, groups book a week ahead. ")
    text = base
    while len(text.split()) < words:
        text += base
    return " ".join(text.split()[:words])


def build_trace(tenants: int, conversations: int, turns: int, system_words: int,
                seed: int) -> list[tuple[int, list[str]]]:
    """(tenant, the user questions of one conversation) for every conversation, shuffled."""
    rng = random.Random(seed)
    convs = []
    for t in range(tenants):
        for c in range(conversations):
            qs = [f"Question {k + 1} of visitor {c} of tenant {t}: what about "
                  f"{rng.choice(['tickets', 'tours', 'the cafe', 'parking', 'lockers'])} on "
                  f"{rng.choice(['Monday', 'Friday', 'Sunday', 'holidays'])} for "
                  f"{rng.randint(1, 9)} people?" for k in range(turns)]
            convs.append((t, qs))
    rng.shuffle(convs)
    return convs


async def run_trace(base_url: str, convs: list[tuple[int, list[str]]], systems: list[str],
                    clients: int, max_tokens: int) -> tuple[list[Sample], float]:
    queue: asyncio.Queue[tuple[int, list[str]]] = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)
    samples: list[Sample] = []

    async with openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0,
                                  timeout=1800) as client:
        async def one(messages: list[dict[str, str]]) -> str:
            start = time.perf_counter()
            stream = await client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0.0,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            first, text, usage = None, [], None
            async for chunk in stream:
                for c in chunk.choices:
                    if c.delta.content:
                        first = first if first is not None else time.perf_counter()
                        text.append(c.delta.content)
                usage = chunk.usage or usage
            assert usage is not None
            details = usage.prompt_tokens_details
            samples.append(Sample((first or time.perf_counter()) - start,
                                  usage.completion_tokens, usage.prompt_tokens,
                                  (details.cached_tokens or 0) if details else 0))
            return "".join(text)

        async def worker() -> None:
            while not queue.empty():
                tenant, questions = queue.get_nowait()
                messages = [{"role": "system", "content": systems[tenant]}]
                for q in questions:
                    messages.append({"role": "user", "content": q})
                    messages.append({"role": "assistant", "content": await one(messages)})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return samples, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, round(q * (len(vs) - 1))))]


def worker_counters(urls: list[str]) -> list[tuple[float, float]]:
    """(requests, KV-tier hit tokens) per worker, from /metrics."""
    out = []
    for url in urls:
        reqs = tier = 0.0
        for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
            if line.startswith("radixkv_e2e_request_latency_seconds_count"):
                reqs = float(line.split()[-1])
            elif line.startswith("radixkv_kv_tier_hits_tokens_total"):
                tier = float(line.split()[-1])
        out.append((reqs, tier))
    return out


def warm_up(urls: list[str]) -> None:
    """One short request straight to each worker (not through a router: no routing state)."""
    for i, url in enumerate(urls):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0) as c:
            c.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
                {"role": "user", "content": f"warm-up {i}"}])


def measure(label: str, base_url: str, worker_urls: list[str], args: argparse.Namespace,
            convs: list[tuple[int, list[str]]], systems: list[str]) -> dict[str, object]:
    warm_up(worker_urls)
    before = worker_counters(worker_urls)
    samples, wall = asyncio.run(run_trace(base_url, convs, systems, args.clients,
                                          args.max_tokens))
    after = worker_counters(worker_urls)
    prompt = sum(s.prompt_tokens for s in samples)
    ttft = [s.ttft for s in samples]
    row = {"config": label, "requests": len(samples),
           "hit": sum(s.cached_tokens for s in samples) / max(1, prompt),
           "tier": sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / max(1, prompt),
           "p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99),
           "tok_s": sum(s.tokens for s in samples) / wall, "req_s": len(samples) / wall,
           "split": "/".join(str(int(a[0] - b[0])) for a, b in zip(after, before, strict=True)),
           "wall": wall}
    print(f"  {label:<34} {len(samples)} requests in {wall:5.1f} s, hit {row['hit']:.1%}",
          flush=True)
    return row


def quick_model(folder: Path) -> Path:
    """A tiny random Llama with the tests' tiny tokenizer (for --quick)."""
    if not (folder / "config.json").exists():
        from tests.model_fixtures import make_tiny_hf

        make_tiny_hf(folder, "llama", max_position_embeddings=8192)
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random model")
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--workers", default="2,3", help="fleet sizes, default 2,3")
    ap.add_argument("--tenants", type=int, default=6)
    ap.add_argument("--conversations", type=int, default=2, help="per tenant")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=None,
                    help="words per system prompt (default 150; 40 with --quick, whose "
                         "tokenizer spends about 6 tokens per word)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4, help="concurrent conversations")
    ap.add_argument("--pool", type=int, default=None,
                    help="KV tokens per worker (default 2048; 3584 with --quick): a worker holds "
                         "about half the tenants' prefixes, so round robin evicts")
    ap.add_argument("--no-redis", action="store_true", help="skip the shared-tier runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",")]
    if args.system_words is None:
        args.system_words = 40 if args.quick else 150
    if args.pool is None:
        args.pool = 3584 if args.quick else 2048
    model = args.model
    if args.quick and model is None:
        model = str(quick_model(Path(tempfile.gettempdir()) / "radixkv-bench-fleet-tiny"))
    serve = [*([model] if model else []), "--served-model-name", MODEL_NAME,
             "--max-total-tokens", str(args.pool)]
    systems = [system_prompt(t, args.system_words) for t in range(args.tenants)]
    convs = build_trace(args.tenants, args.conversations, args.turns, args.system_words,
                        args.seed)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {f.read().split()[0]} on {os.cpu_count()} CPUs; model "
              f"{model or 'default (SmolLM2-135M-Instruct GGUF)'}; {len(convs)} conversations x "
              f"{args.turns} turns, {args.tenants} tenants, {args.clients} clients, pool "
              f"{args.pool} tokens per worker", flush=True)
    rows = []
    for n in sizes:
        tiers = [None] if args.no_redis else [None, LOCAL_REDIS]
        for tier in tiers:
            for policy in ("round_robin", "cache_aware"):
                extra = ["--kv-store-write-through"] if tier else []
                label = f"{n} workers {policy}" + (" + redis" if tier else "")
                with Fleet([*serve, *extra], workers=n, policy=policy, kv_store=tier,
                           threads=1) as fleet:
                    rows.append(measure(label, fleet.base_url, fleet.worker_urls, args, convs,
                                        systems))
        bound = [*serve[:-1], str(args.pool * n)]
        with ServerProcess(bound, env={"OMP_NUM_THREADS": str(n)}) as srv:
            rows.append(measure(f"1 engine, pool {args.pool * n} (bound)", srv.base_url,
                                [srv.url], args, convs, systems))
    print(f"\n{'configuration':<34} {'hit rate':>8} {'of it tier':>10} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'out tok/s':>9} {'req/s':>6}  requests per worker")
    for r in rows:
        print(f"{r['config']:<34} {r['hit']:>8.1%} {r['tier']:>10.1%} "
              f"{r['p50'] * 1e3:>7.0f}ms {r['p99'] * 1e3:>7.0f}ms {r['tok_s']:>9.1f} "
              f"{r['req_s']:>6.2f}  {r['split']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
