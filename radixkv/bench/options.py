"""The suite's command-line options, importable without numpy or torch (the `radixkv` CLI
builds its parser from them on every call). `run.py` validates the values."""

from __future__ import annotations

import argparse

# same names and order as workloads.WORKLOADS (a test keeps them equal)
WORKLOAD_NAMES = ("shared-system", "multi-turn", "few-shot", "tree-of-thought", "no-sharing",
                  "mixed")
DESCRIPTION = ("Prefix-sharing benchmark suite: six token-level workloads replayed on radixkv's "
               "memory levels and on a model; hit rate beside the infinite-cache and Belady "
               "optima, prefill tokens, throughput, TTFT, KV memory; writes summary.md, "
               "results.json and PNG plots.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the suite's options on `p` (`radixkv bench` and `python -m radixkv.bench`)."""
    p.add_argument("--quick", action="store_true",
                   help="small traces and a tiny random model (about a minute)")
    p.add_argument("--workload", action="append", metavar="NAME",
                   help=f"run only this workload (name or number 1-{len(WORKLOAD_NAMES)}); "
                        f"repeatable. Names: {', '.join(WORKLOAD_NAMES)}")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    p.add_argument("--out", default="results", metavar="DIR",
                   help="output folder for summary.md, results.json and plots (default results)")
    p.add_argument("--model", default=None,
                   help="model for model-level runs (.gguf or HF folder); default: the default "
                        "model in full mode, a tiny random Llama in --quick mode")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="model-level weights, activations and KV (default float32)")
    p.add_argument("--skip-model", action="store_true", help="memory-level runs only")
    p.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every system (default 1: on a shared or small "
                        "machine, threads of small kernels wait on each other more than they "
                        "compute; 2 threads ran 4x slower than 1 on a busy 2-core box)")
    p.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
