"""`make demo`: radixkv as a chat backend behind the OpenAI API.

Starts `radixkv serve` (the default SmolLM2-135M-Instruct) on a free loopback port, waits for
/health, then lets several simulated users hold multi-turn conversations at the same time through
the official `openai` client, streaming. Per turn and user it prints the answer, the usage's
`prompt_tokens_details.cached_tokens` and the time to the first streamed token; at the end the
server's prefix-cache hit rate from /metrics. Then it stops the server.

    python examples/serve_demo.py                    # starts its own server
    python examples/serve_demo.py --url http://127.0.0.1:8000 --model NAME   # an existing one

Every user shares the library's system prompt, so a user's first turn is already a cache hit once
another user asked; turn k+1 extends turn k's prompt and answer, so nearly all of it is a hit.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.request
from collections.abc import Sequence

import openai
from prometheus_client.parser import text_string_to_metric_families

SYSTEM = (
    "You are Ada, the help desk assistant of the Lakeside public library. You answer in one or "
    "two short sentences, in plain English, without lists. Opening hours: Monday to Friday 9:00 "
    "to 20:00, Saturday 10:00 to 16:00, closed on Sunday. Members may borrow up to 12 items for "
    "three weeks and renew them twice online unless someone reserved them. Late items cost 20 "
    "cents per day. The reading room on the first floor is quiet; the maker space in the "
    "basement has two 3D printers that must be booked a day ahead. Library cards are free for "
    "residents and need a proof of address."
)

USERS = {
    "maria": ["When are you open on Saturday?", "And can I come on Sunday?",
              "How long may I keep a book?"],
    "tom": ["How much is a late fee?", "I am five days late. What do I owe?",
            "Can I renew online instead?"],
    "lee": ["How do I get a library card?", "Is it free?", "Can I print in 3D there?"],
    "sam": ["Is there a quiet place to study?", "Which floor is it on?",
            "Can I borrow twelve books at once?"],
}


async def converse(client: openai.AsyncOpenAI, model: str, name: str, questions: list[str],
                   max_tokens: int, t0: float) -> None:
    """One user's conversation: each turn streamed, printed when its answer is complete."""
    messages = [{"role": "system", "content": SYSTEM}]
    for turn, question in enumerate(questions, 1):
        messages.append({"role": "user", "content": question})
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.0,
            stream=True, stream_options={"include_usage": True})
        answer, ttft, usage = "", None, None
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    answer += choice.delta.content
            usage = chunk.usage or usage
        wall = time.perf_counter() - start
        messages.append({"role": "assistant", "content": answer.strip()})
        assert usage is not None
        cached = usage.prompt_tokens_details.cached_tokens
        print(f"[{time.perf_counter() - t0:6.1f} s] turn {turn} {name}: {question}\n"
              f"    -> {answer.strip()}\n"
              f"       cached {cached}/{usage.prompt_tokens} prompt tokens, ttft "
              f"{1000 * (ttft or wall):.0f} ms, {usage.completion_tokens} tokens in "
              f"{wall:.2f} s", flush=True)


def hit_rate(url: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, query tokens) from the server's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    values = {s.name: s.value for fam in text_string_to_metric_families(text)
              for s in fam.samples}
    return (values["radixkv_prefix_cache_hits_tokens_total"],
            values["radixkv_prefix_cache_queries_tokens_total"])


async def chat_all(url: str, model: str, users: dict[str, list[str]], max_tokens: int) -> None:
    t0 = time.perf_counter()
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0,
                                  timeout=600) as client:
        await asyncio.gather(*(converse(client, model, name, qs, max_tokens, t0)
                               for name, qs in users.items()))
    hits, queries = hit_rate(url)
    print(f"\nserver prefix cache (from /metrics): {hits:.0f} of {queries:.0f} prompt tokens "
          f"were hits, hit rate {hits / max(queries, 1):.1%}; {len(users)} users, "
          f"{sum(map(len, users.values()))} turns in {time.perf_counter() - t0:.1f} s")


def served_name(url: str) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="demo") as client:
        return client.models.list().data[0].id


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--model", default=None, help="model for the started server, or the "
                    "served name at --url (default: the default model)")
    ap.add_argument("--users", type=int, default=len(USERS), help="simulated users")
    ap.add_argument("--turns", type=int, default=3, help="turns per user")
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens per answer")
    args = ap.parse_args(argv)
    users = {name: qs[:args.turns] for name, qs in list(USERS.items())[:args.users]}
    if args.url:
        model = args.model or served_name(args.url)
        asyncio.run(chat_all(args.url, model, users, args.max_tokens))
        return 0
    from radixkv.serving.launcher import ServerProcess

    t0 = time.perf_counter()
    serve_args = [args.model] if args.model else []
    with ServerProcess([*serve_args, "--max-total-tokens", "16384"]) as srv:
        print(f"radixkv serve is up at {srv.url} after {time.perf_counter() - t0:.1f} s; "
              f"{len(users)} users chat at once through the openai client\n", flush=True)
        asyncio.run(chat_all(srv.url, served_name(srv.url), users, args.max_tokens))
    print("server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
