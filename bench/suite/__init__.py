"""The prefix-sharing benchmark suite behind `python -m bench` (one module per concept):

- `workloads`: seeded token-level traces (shared system prompt, multi-turn chat, few-shot, tree of
  thought, no sharing, a mixed trace under capacity pressure);
- `runlog`: drives a trace through an engine step by step and logs admissions and KV per step;
- `memory_runs`: the real scheduler, radix tree and pools with scripted outputs, no model;
- `model_runs`: the real engine on a model, and transformers' batched generate;
- `optimal`: the infinite-cache bound and the offline (Belady) optimum of a run;
- `metrics`: figures of one run; `report`: results.json and summary.md; `plots`: PNGs;
- `options` / `run`: the command line and the orchestration.
"""
