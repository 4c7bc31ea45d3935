"""PNG plots of a results dict (see `report.py` for its layout); matplotlib's Agg backend.

- hit_rate_vs_optima_{memory,model}.png: achieved hit rate per system, its Belady optimum (black
  tick) and the infinite-cache bound (dashed line), one panel per workload;
- throughput.png: requests/s and output tokens/s per workload and system (model level);
- ttft_cdf.png: time-to-first-token CDF per system, one panel per workload (model level);
- hit_vs_capacity.png: achieved (lpm) and Belady hit rate against pool size, with the bound;
- memory_efficiency.png: contiguous reservation vs KV used vs radixkv slots per workload.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

COLORS = {"radixkv lpm": "#1f77b4", "radixkv fcfs": "#ff7f0e", "radixkv dfs-weight": "#2ca02c",
          "radixkv cache off": "#7f7f7f", "transformers generate": "#d62728"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _panels(plt: Any, n: int, width: float = 4.6, height: float = 3.4) -> tuple[Any, list[Any]]:
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _short(name: str) -> str:
    return name.replace("radixkv ", "").replace("transformers generate", "HF generate")


def hit_vs_optima(results: dict[str, Any], level: str, path: Path) -> Path | None:
    items = [(w["title"], w[level]) for w in results["workloads"].values() if w.get(level)]
    if not items:
        return None
    plt = _plt()
    fig, axes = _panels(plt, len(items))
    for ax, (title, part) in zip(axes, items, strict=True):
        systems = part["systems"]
        x = np.arange(len(systems))
        hits = [100 * s["hit_rate"] for s in systems]
        ax.bar(x, hits, color=[COLORS.get(s["system"], "#999") for s in systems])
        for xi, s, h in zip(x, systems, hits, strict=True):
            ax.text(xi, h + 1, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
            if s.get("belady_hit_rate") is not None:
                ax.hlines(100 * s["belady_hit_rate"], xi - 0.4, xi + 0.4, colors="black", lw=2)
        # the bound of each system's own sequences (model level: outputs differ per system)
        inf = max(100 * s["infinite_hit_rate"] for s in systems)
        ax.axhline(inf, color="black", ls="--", lw=1)
        ax.set_xticks(x, [_short(s["system"]) for s in systems], rotation=20, fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("token hit rate (%)")
        ax.set_title(f"{title} (infinite {inf:.1f}%)", fontsize=10)
    from matplotlib.lines import Line2D

    fig.legend([Line2D([], [], color="black", lw=2), Line2D([], [], color="black", ls="--")],
               ["Belady optimum at the pool size, in the system's own admission order",
                "infinite-cache bound"], loc="lower center", ncol=2, fontsize=9)
    fig.suptitle(f"Achieved token hit rate vs optima ({level} level)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput(results: dict[str, Any], path: Path) -> Path | None:
    items = [(w["title"], w["model"]) for w in results["workloads"].values() if w.get("model")]
    if not items:
        return None
    plt = _plt()
    systems = [s["system"] for s in items[0][1]["systems"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / len(systems)
    x = np.arange(len(items))
    for ax, key, label in ((axes[0], "req_per_s", "requests / s"),
                           (axes[1], "out_tok_per_s", "output tokens / s")):
        for k, name in enumerate(systems):
            vals = []
            for _, part in items:
                e = next((s for s in part["systems"] if s["system"] == name), None)
                vals.append((e.get(key) or 0.0) if e else 0.0)
            ax.bar(x + (k - (len(systems) - 1) / 2) * width, vals, width,
                   color=COLORS.get(name, "#999"), label=_short(name))
        ax.set_xticks(x, [t for t, _ in items], rotation=15, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Throughput (model level: {results['meta'].get('model')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ttft_cdf(results: dict[str, Any], path: Path) -> Path | None:
    items = [(w["title"], w["model"]) for w in results["workloads"].values() if w.get("model")]
    if not items:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = _panels(plt, len(items))
    for ax, (title, part) in zip(axes, items, strict=True):
        for s in part["systems"]:
            t = np.sort(np.asarray(s.get("ttft_ms") or [], dtype=float))
            if not len(t):
                continue
            ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post",
                    color=COLORS.get(s["system"], "#999"), label=_short(s["system"]))
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Time-to-first-token CDF (model level)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hit_vs_capacity(results: dict[str, Any], path: Path) -> Path | None:
    items = [(w["title"], w["memory"]["capacity_sweep"]) for w in results["workloads"].values()
             if (w.get("memory") or {}).get("capacity_sweep")]
    if not items:
        return None
    plt = _plt()
    from matplotlib.ticker import NullFormatter

    fig, axes = _panels(plt, len(items))
    for ax, (title, pts) in zip(axes, items, strict=True):
        pts = sorted(pts, key=lambda p: p["capacity"])
        cap = [p["capacity"] for p in pts]
        ax.plot(cap, [100 * p["hit_rate"] for p in pts], "o-", label="achieved (lpm, LRU)")
        ax.plot(cap, [100 * p["belady_hit_rate"] for p in pts], "s--", color="black",
                label="Belady (same order)")
        ax.axhline(100 * pts[0]["infinite_hit_rate"], color="gray", ls=":",
                   label="infinite cache")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels collide
        ax.set_xlabel("KV pool capacity (token slots, log scale)")
        ax.set_ylabel("token hit rate (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Hit rate vs pool capacity (memory level)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_efficiency(results: dict[str, Any], path: Path) -> Path | None:
    items = [(w["title"], w["memory"]["memory_efficiency"]) for w in results["workloads"].values()
             if (w.get("memory") or {}).get("memory_efficiency")]
    if not items:
        return None
    plt = _plt()
    bpt = items[0][1]["kv_bytes_per_token"]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    x = np.arange(len(items))
    keys = (("reserved_mean_tokens", "contiguous reservation (prompt + max_tokens)", "#d62728"),
            ("used_mean_tokens", "KV used by running requests", "#ff7f0e"),
            ("radixkv_mean_tokens", "radixkv per-token slots (shared once)", "#1f77b4"))
    for k, (key, label, color) in enumerate(keys):
        ax.bar(x + (k - 1) * 0.27, [e[key] * bpt / 2**20 for _, e in items], 0.27, label=label,
               color=color)
    ax.set_xticks(x, [t for t, _ in items], rotation=15, fontsize=8)
    ax.set_ylabel(f"mean KV memory (MiB at {bpt:,} B/token)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("KV memory: reserved vs used vs radixkv slots (memory level, lpm)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    made = [hit_vs_optima(results, "memory", out / "hit_rate_vs_optima_memory.png"),
            hit_vs_optima(results, "model", out / "hit_rate_vs_optima_model.png"),
            throughput(results, out / "throughput.png"),
            ttft_cdf(results, out / "ttft_cdf.png"),
            hit_vs_capacity(results, out / "hit_vs_capacity.png"),
            memory_efficiency(results, out / "memory_efficiency.png")]
    return [p for p in made if p is not None]
