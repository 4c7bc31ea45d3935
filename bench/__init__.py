"""Standalone micro-benchmarks: `tree_ops.py`, `attention.py`, `model.py`, `engine.py`.

The prefix-sharing suite (token-level workloads replayed on the memory levels and on a model,
hit rates beside their optima, throughput, time to first token, KV memory) is part of the package,
`radixkv/bench/`, and runs as `radixkv bench`; `python -m bench` here is a shim for it.
"""
