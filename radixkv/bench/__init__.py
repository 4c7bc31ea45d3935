"""The prefix-sharing benchmark suite behind `radixkv bench` (one module per concept).

It sits at the serving level: it drives the engine (`Engine`, `Scheduler`) and the memory
levels, and only `radixkv.cli` imports it. `bench/` in the source tree keeps the standalone
micro-benchmarks (`tree_ops.py`, `attention.py`, `model.py`, `engine.py`).

- `workloads`: seeded token-level traces (shared system prompt, multi-turn chat, few-shot, tree of
  thought, no sharing, a mixed trace under capacity pressure);
- `runlog`: drives a trace through an engine step by step and logs admissions and KV per step;
- `memory_runs`: the real scheduler, radix tree and pools with scripted outputs, no model;
- `model_runs`: the real engine on a model, and transformers' batched generate;
- `optimal`: the infinite-cache bound and the offline (Belady) optimum of a run;
- `metrics`: figures of one run; `report`: results.json and summary.md; `plots`: PNGs;
- `options` / `run`: the command line and the orchestration.
"""
