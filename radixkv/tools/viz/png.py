"""PNG drawings with matplotlib's Agg canvas (no pyplot): the radix tree and the pool's memory map.
matplotlib is imported inside the renderers, so importing this module stays cheap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radixkv.errors import ConfigError
from radixkv.memory.tree_text import (
    check_depth,
    check_tokenizer,
    node_names,
    root_label,
    subtree_size,
    token_text,
)
from radixkv.tools.viz.colours import EVICTABLE, INNER, LOCKED, ROOT, node_colour
from radixkv.tools.viz.memory_map import (
    OWNER_CONFLICT,
    OWNER_FREE,
    OWNER_RESERVED,
    OWNER_UNOWNED,
    MemoryMap,
)

if TYPE_CHECKING:
    from radixkv.memory import RadixCache, TreeNode


@dataclass
class _Box:
    label: str
    colour: str
    children: list[_Box]
    x: float = 0.0
    depth: int = 0


def _layout(cache: RadixCache, tokenizer: Any, max_depth: int | None,
            max_nodes: int) -> list[_Box]:
    """Boxes of the visible tree with x (leaf order, parents centred) and depth set."""
    names = node_names(cache)
    budget = [max_nodes]

    def build(node: TreeNode, depth: int) -> _Box:
        budget[0] -= 1
        label = (f"{names[id(node)]} · len {len(node)}\n{token_text(node, tokenizer, 18)}\n"
                 f"lock {node.lock_ref} · hits {node.hit_count}")
        box = _Box(label, node_colour(node), [], depth=depth)
        kids = list(node.children.values())
        if kids and max_depth is not None and depth >= max_depth:
            box.children.append(_Box(f"… {subtree_size(node)} more", "white", [], depth=depth + 1))
            return box
        for i, child in enumerate(kids):
            if budget[0] <= 0:
                rest = sum(1 + subtree_size(c) for c in kids[i:])
                box.children.append(_Box(f"… {rest} more", "white", [], depth=depth + 1))
                break
            box.children.append(build(child, depth + 1))
        return box

    roots = []
    for ns, root in cache.roots().items():
        rbox = _Box(root_label(ns), ROOT, [], depth=0)
        for child in root.children.values():
            if budget[0] <= 0:
                rbox.children.append(_Box("… more", "white", [], depth=1))
                break
            rbox.children.append(build(child, 1))
        roots.append(rbox)
    next_x = [0.0]

    def place(box: _Box) -> None:
        if not box.children:
            box.x = next_x[0]
            next_x[0] += 1
            return
        for c in box.children:
            place(c)
        box.x = (box.children[0].x + box.children[-1].x) / 2

    for rbox in roots:
        place(rbox)
    return roots


def render_tree_png(cache: RadixCache, path: str | Path, tokenizer: Any = None,
                    max_depth: int | None = None, max_nodes: int = 40, dpi: int = 100) -> Path:
    """Draw the tree as a PNG with matplotlib (Agg canvas, no pyplot). Returns the path.

    At most `max_nodes` nodes are drawn; the rest, and anything below `max_depth`, become
    '… N more' boxes.
    """
    check_depth(max_depth)
    check_tokenizer(tokenizer)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    roots = _layout(cache, tokenizer, max_depth, max_nodes)
    boxes: list[_Box] = []
    stack = list(roots)
    while stack:
        b = stack.pop()
        boxes.append(b)
        stack.extend(b.children)
    leaves = max(1, sum(1 for b in boxes if not b.children))
    depth = max((b.depth for b in boxes), default=0)
    width = min(40.0, max(6.0, 2.1 * leaves))
    fig = Figure(figsize=(width, max(3.0, 1.35 * (depth + 1) + 0.8)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.07, 0.98, 0.85))
    ax.set_axis_off()
    ax.set_xlim(-0.6, leaves - 0.4)
    ax.set_ylim(-depth - 0.6, 0.6)
    fontsize = 8 if width < 40 else max(5.0, 8 * 40 / (2.1 * leaves))
    for b in boxes:
        for c in b.children:
            ax.plot([b.x, c.x], [-b.depth, -c.depth], color="#888888", linewidth=1, zorder=1)
    for b in boxes:
        ax.text(b.x, -b.depth, b.label, ha="center", va="center", fontsize=fontsize,
                family="monospace", zorder=2,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": b.colour, "edgecolor": "#555555"})
    stats = cache.stats()
    fig.suptitle(f"radix tree: {stats.node_count} nodes, {stats.total_size} tokens "
                 f"({stats.protected_size} locked)", fontsize=11)
    fig.legend(handles=[Patch(facecolor=LOCKED, edgecolor="#555555", label="locked"),
                        Patch(facecolor=EVICTABLE, edgecolor="#555555", label="evictable leaf"),
                        Patch(facecolor=INNER, edgecolor="#555555", label="inner node")],
               loc="lower center", fontsize=8, ncols=3, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def render_memory_map_png(mm: MemoryMap, path: str | Path, width: int | None = None,
                          dpi: int = 100) -> Path:
    """Draw the pool as a grid of slots (row-major, `width` per row) coloured by owner.

    Free slots are white, slot 0 grey, tree nodes in pastel colours, running requests in strong
    colours; a dot marks tree slots a running request reads. Returns the path.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    total = len(mm.owner)
    if width is None:
        width = 32 if total <= 512 else 64
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    rows = -(-total // width)
    # Pastel node colours without reds and pinks (running requests) or greys (slot 0, free).
    pastel = colormaps["Pastel1"].colors + colormaps["Pastel2"].colors
    node_pal = np.asarray([c for i, c in enumerate(pastel) if i not in (0, 7, 8, 12, 16)])[:, :3]
    req_pal = np.asarray(colormaps["Set1"].colors)[:, :3]
    colours = []
    n_node = n_req = 0
    for kind in mm.kinds:
        if kind == "node":
            colours.append(node_pal[n_node % len(node_pal)])
            n_node += 1
        else:
            colours.append(req_pal[n_req % len(req_pal)])
            n_req += 1
    special = {OWNER_RESERVED: (0.45, 0.45, 0.45), OWNER_FREE: (1.0, 1.0, 1.0),
               OWNER_UNOWNED: (1.0, 0.0, 1.0), OWNER_CONFLICT: (0.0, 0.0, 0.0)}
    img = np.ones((rows * width, 3))
    for i, o in enumerate(mm.owner.tolist()):
        img[i] = special[o] if o < 0 else colours[o]
    img = img.reshape(rows, width, 3)
    fig = Figure(figsize=(max(6.0, width * 0.22 + 3.5), max(2.5, rows * 0.22 + 1.6)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.05, 0.08, 0.62, 0.8))
    ax.imshow(img, interpolation="nearest", aspect="equal")
    ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="#cccccc", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(rows), [str(r * width) for r in range(rows)], fontsize=7)
    ax.set_xticks(range(0, width, 8), [str(c) for c in range(0, width, 8)], fontsize=7)
    ax.set_xlabel("slot (row start + column)")
    sh = np.flatnonzero(mm.shared)
    if sh.size:
        ax.scatter(sh % width, sh // width, s=6, color="black", marker="o")
    handles = [Patch(facecolor=special[OWNER_FREE], edgecolor="#999999",
                     label=f"free ({mm.count(OWNER_FREE)})"),
               Patch(facecolor=special[OWNER_RESERVED], label="slot 0 (reserved)")]
    shown = list(enumerate(zip(mm.labels, mm.kinds, strict=True)))[:24]
    for i, (label, kind) in shown:
        what = "node" if kind == "node" else "request"
        handles.append(Patch(facecolor=colours[i], edgecolor="#999999",
                             label=f"{what} {label} ({mm.count(i)})"))
    if len(mm.labels) > len(shown):
        handles.append(Patch(facecolor="white", label=f"… {len(mm.labels) - len(shown)} more"))
    for code, label in ((OWNER_UNOWNED, "allocated, no owner"), (OWNER_CONFLICT, "conflict")):
        if mm.count(code):
            handles.append(Patch(facecolor=special[code], label=f"{label} ({mm.count(code)})"))
    if sh.size:
        handles.append(Patch(facecolor="white", edgecolor="black",
                             label=f"• tree slot read by a request ({sh.size})"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.69, 0.5), fontsize=8)
    fig.suptitle(f"KV pool memory map: {mm.num_slots} slots", fontsize=11)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
