"""The comparison PNG: utilisation and concurrency over time, and both block maps over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from radixkv.tools.simulate.results import Comparison, SimResult


def _block_image(r: SimResult) -> np.ndarray:
    """RGB image [num_blocks, ticks, 3]: a colour per request, pale where reserved but unused."""
    from matplotlib import colormaps

    assert r.owner is not None and r.in_use is not None
    palette = np.asarray(colormaps["tab10"].colors)  # [10, 3]
    owner = r.owner.T  # [blocks, ticks]
    img = np.ones(owner.shape + (3,))
    taken = owner >= 0
    img[taken] = palette[owner[taken] % len(palette)]
    pale = taken & ~r.in_use.T
    img[pale] = 0.35 * img[pale] + 0.65
    return img


def _spans(ticks: list[int]) -> list[tuple[int, int]]:
    """Sorted ticks -> [start, stop) runs of consecutive ticks (one shaded span per run)."""
    spans: list[tuple[int, int]] = []
    for t in ticks:
        if spans and spans[-1][1] == t:
            spans[-1] = (spans[-1][0], t + 1)
        else:
            spans.append((t, t + 1))
    return spans


def plot_comparison(cmp: Comparison, path: str | Path, title: str = "") -> Path:
    """Write a PNG: utilisation and concurrency over time, and both block maps over time.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    c, p = cmp.contiguous, cmp.paged
    has_maps = c.owner is not None and p.owner is not None
    fig = Figure(figsize=(12, 8.5 if has_maps else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if has_maps else 1, 2, height_ratios=[1, 1.3] if has_maps else [1])
    ax_u, ax_r = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    end = max(c.ticks, p.ticks)
    for r, color in ((c, "tab:red"), (p, "tab:blue")):
        x = np.arange(r.ticks)
        ax_u.step(x, 100 * r.utilisation(), where="post", color=color,
                  label=f"{r.allocator}: KV in use")
        ax_r.step(x, r.running, where="post", color=color, label=r.allocator)
    ax_u.step(np.arange(c.ticks), 100 * c.reserved / c.num_blocks, where="post",
              color="tab:red", linestyle="--", alpha=0.6, label="contiguous: reserved")
    for start, stop in _spans(sorted({f.tick for f in c.refused_despite_free()})):
        ax_u.axvspan(start, stop, color="tab:red", alpha=0.12, linewidth=0)
    ax_u.set(xlabel="tick", ylabel="% of blocks", ylim=(0, 105), xlim=(0, end),
             title="memory use (shaded: refused with enough free)")
    ax_r.set(xlabel="tick", ylabel="requests", xlim=(0, end), title="requests running")
    ax_r.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_u.legend(loc="lower right", fontsize=8)
    ax_r.legend(loc="upper right", fontsize=8)
    if has_maps:
        for col, r in enumerate((c, p)):
            ax = fig.add_subplot(grid[1, col])
            ax.imshow(_block_image(r), aspect="auto", interpolation="nearest", origin="lower",
                      extent=(0, r.ticks, 0, r.num_blocks))
            ax.set(xlabel="tick", ylabel="block", xlim=(0, end),
                   title=(f"{r.allocator}: block owners over time (pale = reserved, unused)"
                          if r.allocator == "contiguous" else
                          f"{r.allocator}: slot owners over time (slot = block + 1)"))
            frag = r.refused_despite_free()
            if frag and len(r.trace) <= 10:  # small traces: point at the first such refusal
                f = frag[0]
                hole = max((p for p in f.layout if p[2] is None), key=lambda p: p[1])
                ax.annotate(f"{f.request} refused: needs {f.need} adjacent,\n{f.free} free, "
                            f"largest hole {f.largest_hole}",
                            xy=(f.tick + 0.2, hole[0] + hole[1] / 2), fontsize=8, ha="left",
                            va="center",
                            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
            if len(r.trace) <= 10:  # name the colours when there are few requests
                palette = colormaps["tab10"].colors
                ax.legend(handles=[Patch(color=palette[i % 10], label=q.name)
                                   for i, q in enumerate(r.trace)], loc="upper right",
                          fontsize=8)
    fig.suptitle(title or f"{len(c.trace)} requests on {c.num_blocks} blocks")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
