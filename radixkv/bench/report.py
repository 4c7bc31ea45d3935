"""`results.json` (every figure, for machines) and `summary.md` (one table per workload, plus the
memory-efficiency and capacity-sweep tables), from the results dict that `run.py` builds.

Results layout: {"meta": {...}, "workloads": {name: {"title", "notes", "memory": {"trace",
"systems": [...], "memory_efficiency", "capacity_sweep": [...]}, "model": {"trace",
"systems": [...]}}}}. Each system entry holds the dicts of `metrics.py` merged, plus "system",
"level", "leak_free" and "checks" (the list of failed checks, empty when all hold).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_checks(entry: dict[str, Any]) -> list[str]:
    """Names of the internal-consistency checks a system entry fails (empty: all hold)."""
    failed = []
    hit, inf = entry["hit_tokens"], entry["infinite_hit_tokens"]
    bel = entry.get("belady_hit_tokens")
    if bel is not None:
        if hit > bel:
            failed.append("achieved > belady")
        if bel > inf:
            failed.append("belady > infinite")
        if not entry.get("achieved_within_reach", True):
            failed.append("hit on unmaterialized tokens")
    if hit > inf:
        failed.append("achieved > infinite")
    if not entry.get("conserved", True):
        failed.append("tokens not conserved")
    if not entry.get("per_request_consistent", True):
        failed.append("per-request prefill mismatch")
    if not entry.get("leak_free", True):
        failed.append("leak")
    return failed


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


# ---- markdown ------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def _mib(n_bytes: float | None) -> str:
    return "–" if n_bytes is None else f"{n_bytes / 2**20:,.1f} MiB"


def _table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _trace_line(level: str, t: dict[str, Any]) -> str:
    pool = f"pool {t['capacity']:,} slots"
    if t.get("capacity_fraction") is not None:
        pool += f" = {t['capacity_share']:.0%} of the working set"
        if t["capacity_share"] > t["capacity_fraction"] + 0.005:
            pool += (f" (asked {t['capacity_fraction']:.0%}; the largest request must fit)")
    else:
        pool += " (holds the working set and every running request)"
    return (f"- {level}: {t['requests']:,} requests, {t['prompt_tokens']:,} prompt tokens, "
            f"working set {t['working_set']:,} tokens, {pool}")


def workload_table(w: dict[str, Any]) -> list[str]:
    headers = ["level", "system", "hit rate", "Belady", "infinite", "prefill computed",
               "preempt", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "KV mean / peak",
               "checks"]
    rows = []
    for level in ("memory", "model"):
        part = w.get(level)
        if not part:
            continue
        for e in part["systems"]:
            if "kv_peak_tokens" not in e:  # transformers: no paged pool to read
                kv = "–"
            elif level == "model":
                kv = f"{e['kv_mean_bytes'] / 2**20:,.1f} / {_mib(e['kv_peak_bytes'])}"
            else:
                kv = f"{e['kv_mean_tokens']:,.0f} / {e['kv_peak_tokens']:,} tok"
            rows.append([level, e["system"], _pct(e["hit_rate"]), _pct(e.get("belady_hit_rate")),
                         _pct(e["infinite_hit_rate"]), _num(e["prefill_tokens"]),
                         _num(e.get("preemptions")), _num(e.get("req_per_s"), 2),
                         _num(e.get("out_tok_per_s"), 1), _num(e.get("ttft_p50_ms"), 0),
                         _num(e.get("ttft_p99_ms"), 0), kv,
                         "ok" if not e["checks"] else "FAIL: " + ", ".join(e["checks"])])
    return _table(headers, rows, "llrrrrrrrrrrl")


def efficiency_table(results: dict[str, Any]) -> list[str]:
    headers = ["workload", "contiguous reserved", "KV used", "radixkv slots", "used / reserved",
               "radixkv / used"]
    rows = []
    bpt = None
    for w in results["workloads"].values():
        eff = (w.get("memory") or {}).get("memory_efficiency")
        if not eff:
            continue
        bpt = eff["kv_bytes_per_token"]
        rows.append([w["title"], _mib(eff["reserved_mean_tokens"] * bpt),
                     _mib(eff["used_mean_tokens"] * bpt), _mib(eff["radixkv_mean_tokens"] * bpt),
                     _pct(eff["used_of_reserved"]), _pct(eff["radixkv_of_used"])])
    if not rows:
        return []
    return _table(headers, rows, "lrrrrr")


def sweep_table(results: dict[str, Any]) -> list[str]:
    fractions: list[float] = []
    for w in results["workloads"].values():
        for p in (w.get("memory") or {}).get("capacity_sweep", []):
            if not p.get("main") and p["fraction"] not in fractions:
                fractions.append(p["fraction"])
    if not fractions:
        return []
    fractions.sort()
    rows = []
    for w in results["workloads"].values():
        points = (w.get("memory") or {}).get("capacity_sweep", [])
        if not points:
            continue
        pts = {p["fraction"]: p for p in points if not p.get("main")}
        main = next((p for p in points if p.get("main")), None)
        cells = [f"{100 * pts[f]['hit_rate']:.1f} / {100 * pts[f]['belady_hit_rate']:.1f}"
                 if f in pts else "–" for f in fractions]
        main_cell = ("–" if main is None else
                     f"{100 * main['hit_rate']:.1f} / {100 * main['belady_hit_rate']:.1f} "
                     f"({main['fraction']:.0%})")
        rows.append([w["title"], *cells, main_cell, _pct(points[0]["infinite_hit_rate"])])
    headers = (["workload"] + [f"{f:.0%} of WS" for f in fractions]
               + ["workload's pool", "infinite"])
    return _table(headers, rows, "l" + "r" * (len(fractions) + 2))


def summary_markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        "# Prefix-sharing benchmark",
        "",
        f"Mode **{m['mode']}**, seed {m['seed']}, {m['threads']} torch threads, "
        f"model-level model: {m.get('model') or 'skipped ' + m.get('model_skipped', '')}; "
        f"ran {m['duration_s']:.0f} s "
        f"({m['started']}). Command: `{m['command']}`.",
        "",
        "Hit rate: prompt tokens served from the prefix cache at admission (the cached prefix of "
        "prompt[:-1]) / prompt tokens. **Belady**: offline optimum at the run's pool size in the "
        "run's own admission order; **infinite**: share an unbounded cache could serve in any "
        "order (1 - unique prefix tokens / prompt tokens); see `radixkv/bench/optimal.py`. Memory "
        "level: real scheduler, radix tree and pools, scripted outputs, no model (no timings). "
        "Model level: real engine on the model, and transformers' batched `generate` (left "
        "padding, greedy, same prompts; no prefix cache, so its hit rate is 0). TTFT counts from "
        "arrival (run start, or the parent's finish for follow-up requests). KV mean / peak: pool "
        "slots in use over the run's steps, the evictable cache included. checks: achieved <= "
        "Belady <= infinite, hit + computed == prompt tokens, no leaked slots.",
        "",
    ]
    for i, w in enumerate(results["workloads"].values(), 1):
        lines += [f"## {i}. {w['title']}", "", w["notes"], ""]
        for level in ("memory", "model"):
            if w.get(level):
                lines.append(_trace_line(f"{level} level", w[level]["trace"]))
        lines += [""] + workload_table(w) + [""]
    eff = efficiency_table(results)
    if eff:
        bpt = next(w["memory"]["memory_efficiency"]["kv_bytes_per_token"]
                   for w in results["workloads"].values()
                   if (w.get("memory") or {}).get("memory_efficiency"))
        lines += ["## Memory efficiency (vLLM paper's point, memory-level lpm runs)", "",
                  f"Mean over steps with running requests, at {bpt:,} bytes per token "
                  f"({m['efficiency_model']}). Contiguous reserved: prompt + declared max_tokens "
                  f"({m['declared_max_tokens']}) pre-allocated per running request; KV used: "
                  "tokens the running requests hold; radixkv slots: per-token slots they hold, "
                  "shared prefixes once.", ""] + eff + [""]
    sweep = sweep_table(results)
    if sweep:
        lines += ["## Hit rate vs pool capacity (memory level, lpm)", "",
                  "achieved / Belady in %, pool = share of the working set (WS), at least the "
                  "largest request; \"–\": that pool size was already run (the floor, or the "
                  "workload's own pool). \"workload's pool\": the main run above. Each Belady "
                  "value is for that run's own admission order.", ""] + sweep + [""]
    return "\n".join(lines)


def rerender(results_json: Path, plots: bool = True) -> str:
    """Rewrite summary.md (and the plots) next to a results.json without rerunning anything."""
    results = json.loads(Path(results_json).read_text())
    out = Path(results_json).parent
    text = summary_markdown(results)
    (out / "summary.md").write_text(text + "\n")
    if plots:
        from radixkv.bench.plots import write_all

        write_all(results, out)
    return text


if __name__ == "__main__":  # python -m radixkv.bench.report results/results.json
    import sys

    print(rerender(Path(sys.argv[1] if len(sys.argv) > 1 else "results/results.json")))
