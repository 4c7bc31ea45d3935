"""The suite's command line and orchestration: `radixkv bench` (also `python -m radixkv.bench`).

    radixkv bench --quick                   # about a minute: small traces, a tiny random model
    radixkv bench                           # full: long memory-level traces, the default model
    radixkv bench --workload few-shot --workload 6 --seed 1 --out results/run1

For each workload: memory-level runs of every radixkv system (lpm, fcfs, dfs-weight, cache off),
the memory-efficiency figures and a capacity sweep; then model-level runs of the same systems plus
transformers' batched generate. Writes OUT/results.json, OUT/summary.md and PNG plots, prints the
summary, and exits 1 if any internal-consistency check failed (achieved <= Belady <= infinite,
token conservation, leaks). The same seed gives the same traces and the same hit rates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radixkv.bench import workloads
from radixkv.bench.memory_runs import SYSTEMS, run_memory
from radixkv.bench.metrics import (
    hit_metrics,
    kv_metrics,
    memory_efficiency,
    timing_metrics,
)
from radixkv.bench.optimal import infinite_bound, working_set
from radixkv.bench.options import DESCRIPTION, add_arguments
from radixkv.bench.report import run_checks, summary_markdown, write_json
from radixkv.bench.workloads import Trace

# KV bytes per token used to express memory-level figures in bytes: the default model
# (SmolLM2-135M: 30 layers x 3 KV heads x head_dim 64, K and V) with an fp32 cache.
EFFICIENCY_MODEL = "SmolLM2-135M, fp32 KV"
EFFICIENCY_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


@dataclass(frozen=True)
class LevelConfig:
    size_key: str
    max_running: int  # requests decoded together
    window: int  # released requests waiting for admission at most
    chunk: int  # chunked prefill size


@dataclass(frozen=True)
class ModeConfig:
    memory: LevelConfig
    model: LevelConfig
    sweep: tuple[float, ...]  # capacity sweep: shares of the working set (plus the main run)
    declared_max_tokens: int  # what memory-level clients ask for (answers stop earlier)


MODES = {
    "quick": ModeConfig(LevelConfig("memory-quick", 8, 16, 256),
                        LevelConfig("model-quick", 4, 8, 256), (0.1, 0.3), 128),
    "full": ModeConfig(LevelConfig("memory-full", 16, 64, 512),
                       LevelConfig("model-full", 8, 16, 512),
                       (0.03, 0.06, 0.12, 0.25, 0.5), 512),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="radixkv bench", description=DESCRIPTION)
    add_arguments(p)
    return p.parse_args(argv)


def select_workloads(names: list[str] | None) -> list[str]:
    if not names:
        return list(workloads.WORKLOADS)
    chosen = []
    for raw in names:
        for name in raw.split(","):
            name = name.strip()
            if name.isdigit() and 1 <= int(name) <= len(workloads.WORKLOADS):
                name = workloads.WORKLOADS[int(name) - 1]
            if name not in workloads.WORKLOADS:
                raise SystemExit(f"unknown workload {name!r}; choose from "
                                 f"{', '.join(workloads.WORKLOADS)} or their numbers")
            if name not in chosen:
                chosen.append(name)
    return chosen


# ---- sizing --------------------------------------------------------------------------------------
def scripted_sequences(trace: Trace) -> list[np.ndarray]:
    """S_j with the scripted answers: what the run's KV covers per request."""
    return [np.concatenate([p, r.answer])[:-1]
            for p, r in zip(trace.scripted_prompts(), trace.requests, strict=True)]


def min_capacity(trace: Trace, declared: int) -> int:
    """The largest request (prompt + max_tokens) must fit the pool."""
    return max(len(p) + max(trace.max_tokens(i), declared)
               for i, p in enumerate(trace.scripted_prompts()))


def pool_capacity(trace: Trace, ws: int, max_running: int, declared: int) -> int:
    """Pool size for a workload: a share of the working set when the workload asks for capacity
    pressure, else the working set plus room for every running request's own tokens."""
    need = min_capacity(trace, declared)
    if trace.capacity_fraction is not None:
        return max(int(trace.capacity_fraction * ws), need)
    return ws + max_running * need


def trace_info(trace: Trace, ws: int, capacity: int) -> dict[str, Any]:
    return {"requests": len(trace),
            "prompt_tokens": int(sum(len(p) for p in trace.scripted_prompts())),
            "working_set": ws, "capacity": capacity,
            "capacity_fraction": trace.capacity_fraction,  # asked for (None: ample)
            "capacity_share": capacity / ws if ws else None}  # what the pool really holds


# ---- progress ------------------------------------------------------------------------------------
class Progress:
    """One tqdm bar per run (requests finished), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, desc: str, total: int) -> tuple[Callable[[int], Any] | None, Callable[[], None]]:
        if not self.enabled:
            return None, lambda: None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr)
        return bar.update, bar.close


def sweep_point(m: dict[str, Any], fraction: float, capacity: int,
                main: bool = False) -> dict[str, Any]:
    """One capacity-sweep point from a run's hit metrics (`main`: the workload's own pool)."""
    return {"fraction": fraction, "capacity": capacity, "main": main, "hit_rate": m["hit_rate"],
            "belady_hit_rate": m["belady_hit_rate"], "infinite_hit_rate": m["infinite_hit_rate"],
            "hit_tokens": m["hit_tokens"], "belady_hit_tokens": m["belady_hit_tokens"],
            "infinite_hit_tokens": m["infinite_hit_tokens"],
            "evicted_tokens": m["evicted_tokens"], "preemptions": m["preemptions"],
            "checks": run_checks(m)}


# ---- levels --------------------------------------------------------------------------------------
def memory_level(name: str, mode: ModeConfig, seed: int, progress: Progress) -> dict[str, Any]:
    cfg = mode.memory
    trace = workloads.build(name, cfg.size_key, seed)
    ws = working_set(scripted_sequences(trace))
    cap = pool_capacity(trace, ws, cfg.max_running, mode.declared_max_tokens)
    systems = []
    efficiency: dict[str, Any] = {}
    for system in SYSTEMS:
        update, close = progress.bar(f"memory {name} {system.name}", len(trace))
        try:
            run = run_memory(trace, system, cap, max_running=cfg.max_running, window=cfg.window,
                             chunk=cfg.chunk, declared_max_tokens=mode.declared_max_tokens,
                             progress=update)
        finally:
            close()
        entry = {"system": system.name, "level": "memory",
                 **hit_metrics(run.log, run.prefill_counter),
                 **kv_metrics(run.log, EFFICIENCY_BYTES_PER_TOKEN),
                 "evicted_tokens": run.evicted_tokens, "leak_free": run.leak_free}
        entry["checks"] = run_checks(entry)
        systems.append(entry)
        if system == SYSTEMS[0]:  # radixkv lpm: the memory-efficiency figures
            efficiency = memory_efficiency(run.log, EFFICIENCY_BYTES_PER_TOKEN)
    need = min_capacity(trace, mode.declared_max_tokens)
    sweep = [sweep_point(systems[0], cap / ws, cap, main=True)]  # lpm above: one more point
    seen = {cap}
    for frac in mode.sweep:
        c = max(int(frac * ws), need)
        if c in seen:
            continue
        seen.add(c)
        update, close = progress.bar(f"sweep {name} {frac:.0%}", len(trace))
        try:
            run = run_memory(trace, SYSTEMS[0], c, max_running=cfg.max_running,
                             window=cfg.window, chunk=cfg.chunk,
                             declared_max_tokens=mode.declared_max_tokens, progress=update)
        finally:
            close()
        m = {**hit_metrics(run.log, run.prefill_counter), "leak_free": run.leak_free,
             "evicted_tokens": run.evicted_tokens}
        sweep.append(sweep_point(m, frac, c))
    sweep.sort(key=lambda p: p["capacity"])
    return {"trace": trace_info(trace, ws, cap), "systems": systems,
            "memory_efficiency": efficiency, "capacity_sweep": sweep}


def model_level(bench: Any, name: str, mode: ModeConfig, seed: int, skip_hf: bool,
                progress: Progress) -> dict[str, Any]:
    from radixkv.bench.model_runs import HF_SYSTEM

    cfg = mode.model
    trace = workloads.build(name, cfg.size_key, seed)
    ws = working_set(scripted_sequences(trace))
    cap = pool_capacity(trace, ws, cfg.max_running, 0)
    systems = []
    for system in SYSTEMS:
        update, close = progress.bar(f"model {name} {system.name}", len(trace))
        try:
            run = bench.run_engine(trace, system, cap, max_running=cfg.max_running,
                                   window=cfg.window, chunk=cfg.chunk, progress=update)
        finally:
            close()
        log = run.log
        entry = {"system": system.name, "level": "model",
                 **hit_metrics(log, run.prefill_counter),
                 **kv_metrics(log, run.kv_bytes_per_token),
                 **timing_metrics(log.arrival, log.first_token, log.finish,
                                  sum(len(o) for o in log.outputs), log.wall_s),
                 "evicted_tokens": run.evicted_tokens, "leak_free": run.leak_free}
        entry["checks"] = run_checks(entry)
        systems.append(entry)
    if not skip_hf:
        update, close = progress.bar(f"model {name} {HF_SYSTEM}", len(trace))
        try:
            hf = bench.run_hf(trace, cfg.max_running, progress=update)
        finally:
            close()
        seqs = [np.concatenate([p, o])[:-1] for p, o in zip(hf.prompts, hf.outputs, strict=True)]
        lens = np.array([len(p) for p in hf.prompts], np.int64)
        inf = infinite_bound(seqs, lens)
        entry = {"system": HF_SYSTEM, "level": "model", "requests": len(trace),
                 "prompt_tokens": int(lens.sum()), "hit_tokens": 0, "hit_rate": 0.0,
                 "infinite_hit_tokens": inf.hit_tokens, "infinite_hit_rate": inf.hit_rate,
                 "unique_prefix_tokens": inf.unique_prefix_tokens,
                 "prefill_tokens": int(lens.sum()), "computed_tokens": int(lens.sum()),
                 **timing_metrics(hf.arrival, hf.first_token, hf.finish,
                                  sum(len(o) for o in hf.outputs), hf.wall_s)}
        entry["checks"] = run_checks(entry)
        systems.append(entry)
    return {"trace": trace_info(trace, ws, cap), "systems": systems}


# ---- main ----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite as `args` says; returns the results dict (also written to args.out)."""
    import torch

    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    names = select_workloads(args.workload)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(show)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"mode": mode_name, "seed": args.seed, "workloads": names,
                 "threads": torch.get_num_threads(),
                 "started": dt.datetime.now().isoformat(timespec="seconds"),
                 "command": " ".join(["radixkv bench", *_argv(args)]),
                 "declared_max_tokens": mode.declared_max_tokens,
                 "efficiency_model": EFFICIENCY_MODEL,
                 "config": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v)
                            for k, v in asdict(mode).items()},
                 "model": None},
        "workloads": {n: {"title": workloads.TITLES[n], "notes": ""} for n in names},
    }
    for n in names:
        print(f"[memory] {n} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
        results["workloads"][n]["memory"] = memory_level(n, mode, args.seed, progress)
        results["workloads"][n]["notes"] = workloads.build(
            n, mode.memory.size_key, args.seed).notes
    if not args.skip_model:
        tmp = None
        try:
            from radixkv.errors import ModelLoadError

            model = args.model
            try:
                if model is None and args.quick:
                    from radixkv.bench.model_runs import make_tiny_model

                    tmp = tempfile.mkdtemp(prefix="radixkv-bench-")
                    model = str(make_tiny_model(Path(tmp) / "tiny-llama", seed=args.seed))
                from radixkv.bench.model_runs import ModelBench

                bench = ModelBench(model, dtype=args.dtype)
            except ModelLoadError as exc:  # e.g. the default model is not installed
                print(f"[model] skipped: {exc}", file=sys.stderr)
                results["meta"]["model_skipped"] = str(exc)
                bench = None
            if bench is not None:
                label = ("tiny random Llama (2 layers, hidden 64)"
                         if args.quick and args.model is None else bench.model_name)
                results["meta"]["model"] = f"{label}, {args.dtype}"
                for n in names:
                    print(f"[model] {n} ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr, flush=True)
                    results["workloads"][n]["model"] = model_level(bench, n, mode, args.seed,
                                                                   args.skip_hf, progress)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["duration_s"] = time.perf_counter() - started
    write_json(results, out / "results.json")
    (out / "summary.md").write_text(summary_markdown(results) + "\n")
    if not args.no_plots:
        from radixkv.bench.plots import write_all

        results["meta"]["plots"] = [p.name for p in write_all(results, out)]
        write_json(results, out / "results.json")
    return results


def _argv(args: argparse.Namespace) -> list[str]:
    """The options this run was given, for the summary's command line."""
    argv = getattr(args, "argv", None)
    if argv is None:  # from sys.argv: `radixkv bench ...` puts the subcommand first
        argv = sys.argv[1:]
        if argv[:1] == ["bench"]:
            argv = argv[1:]
    return list(argv)


def failed_checks(results: dict[str, Any]) -> list[str]:
    bad = []
    for name, w in results["workloads"].items():
        for level in ("memory", "model"):
            part = w.get(level) or {}
            for e in part.get("systems", []):
                bad += [f"{name} {level} {e['system']}: {c}" for c in e["checks"]]
            for p in part.get("capacity_sweep", []):
                bad += [f"{name} sweep {p['capacity']}: {c}" for c in p["checks"]]
    return bad


def execute(args: argparse.Namespace) -> int:
    """Run the suite for parsed options, print the summary; 1 if a check failed, else 0."""
    results = run(args)
    out = Path(args.out)
    print(summary_markdown(results))
    print(f"\nwrote {out / 'summary.md'}, {out / 'results.json'}"
          + "".join(f", {out / p}" for p in results["meta"].get("plots", [])))
    bad = failed_checks(results)
    if bad:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`radixkv bench [options]` / `python -m radixkv.bench [options]`."""
    args = parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    return execute(args)
