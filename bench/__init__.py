"""Benchmarks: standalone scripts (`tree_ops.py`, `engine.py`, ...) and the prefix-sharing suite.

`python -m bench` runs the suite (`bench/suite/`): token-level workloads replayed on the memory
levels and on a model, achieved prefix-cache hit rates beside their optima, throughput, time to
first token and KV memory, written to `results/summary.md`, `results/results.json` and PNG plots.
"""
