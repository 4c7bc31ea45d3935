"""Pictures of a real `RadixCache` and its `TokenToKVPool`.

- `format_tree`: a text drawing of the tree (what `RadixCache.pretty()` returns): each node's tokens
  (decoded when a tokenizer is given), length, lock count, last access tick, hits and KV slots.
- `to_dot`: the same tree as Graphviz DOT; `render_tree_png`: a PNG drawn with matplotlib.
- `memory_map`: which pool slot belongs to which tree node or running request, which are free;
  `format_memory_map` and `render_memory_map_png` draw it.
- `build_demo` / `write_pictures`: what `radixkv viz` does: a tree built from a few chat prompts.

Nodes are named n1, n2, ... in `cache.walk()` order in every picture, so the text tree, the DOT
graph, the PNG and the memory map refer to the same nodes by the same names. Only the tree's
public read API is used (`roots()`, `walk()`, node `tokens`, `value`, `lock_ref`, `last_access`,
`hit_count`, `children`). Colours: red = locked (a running request reads it), green = evictable
leaf (the next eviction candidates), blue = unlocked inner node.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radixkv.errors import ConfigError, InvalidSlotError

if TYPE_CHECKING:
    from radixkv.memory import RadixCache, TokenToKVPool, TreeNode

LOCKED, EVICTABLE, INNER, ROOT = "#f4b6b6", "#bfe3bf", "#cfe0f5", "#e4e4e4"
_DECODE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError)


# ---- shared helpers ----------------------------------------------------------------------------
def _check_depth(max_depth: int | None) -> None:
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int)
                                  or max_depth < 1):
        raise ConfigError(f"max_depth must be None or an integer >= 1, got {max_depth!r}")


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(f"tokenizer must have a decode(ids) method, got {type(tokenizer)}")


def node_names(cache: RadixCache) -> dict[int, str]:
    """id(node) -> 'n1', 'n2', ... in `cache.walk()` order (the names every picture uses)."""
    return {id(node): f"n{i}" for i, (node, _) in enumerate(cache.walk(), start=1)}


def node_colour(node: TreeNode) -> str:
    """Red when locked, green for an evictable leaf, blue for an unlocked inner node."""
    if node.lock_ref > 0:
        return LOCKED
    return INNER if node.children else EVICTABLE


def token_text(node: TreeNode, tokenizer: Any = None, limit: int = 40) -> str:
    """The node's tokens: decoded and quoted (escapes visible) or as ids, cut to ~`limit` chars."""
    ids = node.tokens.tolist()
    if tokenizer is not None:
        try:
            text = str(tokenizer.decode(ids))
        except _DECODE_ERRORS:
            text = None
        if text is not None:
            if len(text) > limit:
                text = text[:limit - 1] + "…"
            return json.dumps(text, ensure_ascii=False)
    shown = ids[:6]
    more = f", … +{len(ids) - len(shown)}" if len(ids) > len(shown) else ""
    return "[" + ", ".join(map(str, shown)) + more + "]"


def slot_runs(slots: np.ndarray, max_runs: int = 4) -> str:
    """Slots as runs of consecutive ids: [3,4,5,9,12,13] -> '3-5,9,12-13'."""
    arr = np.asarray(slots, dtype=np.int64)
    if arr.size == 0:
        return "-"
    breaks = np.flatnonzero(np.diff(arr) != 1) + 1
    runs = []
    for part in np.split(arr, breaks)[:max_runs]:
        runs.append(str(part[0]) if part.size == 1 else f"{part[0]}-{part[-1]}")
    extra = len(breaks) + 1 - max_runs
    return ",".join(runs) + (f",… (+{extra} runs)" if extra > 0 else "")


def _subtree_size(node: TreeNode) -> int:
    count, stack = 0, list(node.children.values())
    while stack:
        n = stack.pop()
        count += 1
        stack.extend(n.children.values())
    return count


def _root_label(namespace: Any) -> str:
    return "root" if namespace is None else f"root (namespace {namespace!r})"


# ---- text --------------------------------------------------------------------------------------
def format_tree(cache: RadixCache, tokenizer: Any = None, max_depth: int | None = None) -> str:
    """A text drawing of the tree, one node per line.

    Each line: name, tokens (decoded with `tokenizer.decode(ids)` when given), length, lock count,
    last access tick, hit count, KV slots. Nodes deeper than `max_depth` are summarised as
    '… N more nodes'. Raises `ConfigError` for a bad `max_depth` or tokenizer.
    """
    _check_depth(max_depth)
    _check_tokenizer(tokenizer)
    names = node_names(cache)
    stats = cache.stats()
    lines = [f"RadixCache: {stats.node_count} nodes, {stats.total_size} tokens cached "
             f"(evictable {stats.evictable_size}, protected {stats.protected_size}), "
             f"page_size {cache.page_size}, {cache.eviction_policy}"]
    roots = cache.roots()
    if not roots:
        lines.append("root (empty)")

    def visit(node: TreeNode, prefix: str, last: bool, depth: int) -> None:
        branch = "└─ " if last else "├─ "
        lines.append(f"{prefix}{branch}{names[id(node)]} {token_text(node, tokenizer)}  "
                     f"len {len(node)} · lock {node.lock_ref} · last {node.last_access} · "
                     f"hits {node.hit_count} · slots {slot_runs(node.value)}")
        child_prefix = prefix + ("   " if last else "│  ")
        kids = list(node.children.values())
        if kids and max_depth is not None and depth >= max_depth:
            n = _subtree_size(node)
            lines.append(f"{child_prefix}└─ … {n} more node{'s' * (n != 1)} below")
            return
        for i, child in enumerate(kids):
            visit(child, child_prefix, i == len(kids) - 1, depth + 1)

    for ns, root in roots.items():
        lines.append(_root_label(ns))
        kids = list(root.children.values())
        for i, child in enumerate(kids):
            visit(child, "", i == len(kids) - 1, 1)
    return "\n".join(lines)


# ---- Graphviz DOT ------------------------------------------------------------------------------
def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(cache: RadixCache, tokenizer: Any = None, max_depth: int | None = None) -> str:
    """The tree as a Graphviz DOT digraph (render with `dot -Tpng tree.dot -o tree.png`)."""
    _check_depth(max_depth)
    _check_tokenizer(tokenizer)
    names = node_names(cache)
    out = ["digraph radix_cache {",
           '  graph [rankdir=TB, fontname="Helvetica", labelloc=t, '
           'label="radix tree: red = locked, green = evictable leaf, blue = inner node"];',
           '  node [shape=box, style="rounded,filled", fontname="Courier", fontsize=10];',
           "  edge [arrowsize=0.6];"]
    for r, (ns, root) in enumerate(cache.roots().items()):
        rid = f"root{r}"
        out.append(f'  {rid} [label="{_dot_escape(_root_label(ns))}", fillcolor="{ROOT}"];')
        stack: list[tuple[TreeNode, str, int]] = [(c, rid, 1) for c in root.children.values()]
        stack.reverse()
        while stack:
            node, parent, depth = stack.pop()
            name = names[id(node)]
            label = _dot_escape(f"{name}  {token_text(node, tokenizer, 32)}") + (
                f"\\nlen {len(node)} | lock {node.lock_ref} | hits {node.hit_count} | "
                f"last {node.last_access}")
            out.append(f'  {name} [label="{label}", fillcolor="{node_colour(node)}"];')
            out.append(f"  {parent} -> {name};")
            kids = list(node.children.values())
            if kids and max_depth is not None and depth >= max_depth:
                more = f"{name}_more"
                out.append(f'  {more} [label="… {_subtree_size(node)} more", shape=plaintext, '
                           'style=""];')
                out.append(f"  {name} -> {more} [style=dashed];")
                continue
            stack.extend((c, name, depth + 1) for c in reversed(kids))
    out.append("}")
    return "\n".join(out) + "\n"


# ---- PNG of the tree ---------------------------------------------------------------------------
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
            box.children.append(_Box(f"… {_subtree_size(node)} more", "white", [], depth=depth + 1))
            return box
        for i, child in enumerate(kids):
            if budget[0] <= 0:
                rest = sum(1 + _subtree_size(c) for c in kids[i:])
                box.children.append(_Box(f"… {rest} more", "white", [], depth=depth + 1))
                break
            box.children.append(build(child, depth + 1))
        return box

    roots = []
    for ns, root in cache.roots().items():
        rbox = _Box(_root_label(ns), ROOT, [], depth=0)
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
    _check_depth(max_depth)
    _check_tokenizer(tokenizer)
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


# ---- memory map --------------------------------------------------------------------------------
OWNER_RESERVED, OWNER_FREE, OWNER_UNOWNED, OWNER_CONFLICT = -1, -2, -3, -4


@dataclass
class MemoryMap:
    """Who owns each KV slot of a pool.

    `owner[s]` (shape [num_slots + 1]) is an index into `labels`/`kinds` (a tree node 'n3' or a
    running request), or OWNER_RESERVED (slot 0), OWNER_FREE, OWNER_UNOWNED (allocated in the
    pool but held by neither the tree nor a listed request: a leak, or a request not listed), or
    OWNER_CONFLICT (claimed twice, or claimed while free in the pool). `shared[s]` marks tree
    slots that a running request also reads (its cached prefix).
    """

    owner: np.ndarray  # [num_slots + 1] int32
    shared: np.ndarray  # [num_slots + 1] bool
    labels: list[str]
    kinds: list[str]  # "node" or "request", per label
    reads: dict[str, int]  # running request -> how many tree slots it reads

    @property
    def num_slots(self) -> int:
        return len(self.owner) - 1

    def count(self, code_or_label: int | str) -> int:
        """Slots owned by a label ('n3', 'alice') or with an OWNER_* code."""
        code = self.labels.index(code_or_label) if isinstance(code_or_label, str) else code_or_label
        return int((self.owner == code).sum())

    def slots_of(self, label: str) -> np.ndarray:
        """Slot ids owned by `label`, ascending."""
        return np.flatnonzero(self.owner == self.labels.index(label))


def memory_map(cache: RadixCache, pool: TokenToKVPool | None = None,
               running: Mapping[str, Any] | None = None) -> MemoryMap:
    """Map every slot of `pool` (default: the cache's pool) to its owner.

    `running` maps a request name to all the slots it reads (a tensor, array or list: its cached
    prefix, which stays owned by the tree and is marked shared, and its own slots). Raises
    `InvalidSlotError` for a slot outside 1..num_slots; inconsistent ownership is not an error
    here but shows as OWNER_CONFLICT / OWNER_UNOWNED, so a broken state can still be drawn.
    """
    from radixkv.memory import as_slot_array

    pool = pool if pool is not None else cache.kv_pool
    n = pool.num_slots
    owner = np.full(n + 1, OWNER_FREE, dtype=np.int32)
    allocated = ~pool.is_free(np.arange(1, n + 1, dtype=np.int64))
    owner[1:][allocated] = OWNER_UNOWNED
    owner[0] = OWNER_RESERVED
    shared = np.zeros(n + 1, dtype=bool)
    labels: list[str] = []
    kinds: list[str] = []
    reads: dict[str, int] = {}
    names = node_names(cache)
    req_slots = {}
    for name, slots in (running or {}).items():  # validate everything before building the map
        arr = as_slot_array(slots)
        if arr.size and (arr.min() < 1 or arr.max() > n):
            bad = int(arr.min()) if arr.min() < 1 else int(arr.max())
            raise InvalidSlotError(f"request {name!r}: slot {bad} is outside 1..{n}")
        req_slots[str(name)] = arr
    for node, _ in cache.walk():
        idx = len(labels)
        labels.append(names[id(node)])
        kinds.append("node")
        s = node.value
        if s.size and (s.min() < 1 or s.max() > n):
            raise InvalidSlotError(f"tree node {labels[-1]} holds slots outside 1..{n}")
        ok = owner[s] == OWNER_UNOWNED
        owner[s[ok]] = idx
        owner[s[~ok]] = OWNER_CONFLICT
    for name, arr in req_slots.items():
        idx = len(labels)
        labels.append(name)
        kinds.append("request")
        cur = owner[arr]
        is_tree = np.array([c >= 0 and kinds[c] == "node" for c in cur.tolist()], dtype=bool)
        shared[arr[is_tree]] = True
        reads[name] = int(is_tree.sum())
        own = arr[~is_tree]
        ok = owner[own] == OWNER_UNOWNED
        owner[own[ok]] = idx
        owner[own[~ok]] = OWNER_CONFLICT
    return MemoryMap(owner=owner, shared=shared, labels=labels, kinds=kinds, reads=reads)


_NODE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_REQ_CHARS = "0123456789"


def _chars(mm: MemoryMap) -> list[str]:
    out, n_node, n_req = [], 0, 0
    for kind in mm.kinds:
        if kind == "node":
            out.append(_NODE_CHARS[n_node % len(_NODE_CHARS)])
            n_node += 1
        else:
            out.append(_REQ_CHARS[n_req % len(_REQ_CHARS)])
            n_req += 1
    return out


def format_memory_map(mm: MemoryMap, width: int = 64) -> str:
    """A character grid of the pool, `width` slots per row, with a legend.

    '#' reserved slot 0, '.' free, letters tree nodes, digits running requests' own slots,
    '?' allocated but unowned, '!' conflict.
    """
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    chars = _chars(mm)
    special = {OWNER_RESERVED: "#", OWNER_FREE: ".", OWNER_UNOWNED: "?", OWNER_CONFLICT: "!"}
    cells = [special[o] if o < 0 else chars[o] for o in mm.owner.tolist()]
    in_tree = sum(mm.count(i) for i, k in enumerate(mm.kinds) if k == "node")
    in_reqs = sum(mm.count(i) for i, k in enumerate(mm.kinds) if k == "request")
    n_nodes = mm.kinds.count("node")
    lines = [f"KV pool: {mm.num_slots} slots: {in_tree} in the tree ({n_nodes} nodes), "
             f"{in_reqs} owned by running requests, {mm.count(OWNER_FREE)} free, "
             f"{mm.count(OWNER_UNOWNED)} unowned, {mm.count(OWNER_CONFLICT)} conflicting",
             "  '#' slot 0 (reserved)  '.' free  a-z/A-Z tree nodes  0-9 running requests  "
             "'?' allocated, no owner  '!' conflict"]
    digits = len(str(mm.num_slots))
    for start in range(0, len(cells), width):
        lines.append(f"  {start:>{digits}} {''.join(cells[start:start + width])}")
    legend = []
    for i, (label, kind) in enumerate(zip(mm.labels, mm.kinds, strict=True)):
        if kind == "node":
            legend.append(f"{chars[i]}={label} ({mm.count(i)})")
        else:
            legend.append(f"{chars[i]}={label} ({mm.count(i)} own + "
                          f"{mm.reads.get(label, 0)} read from the tree)")
    n_shared = int(mm.shared.sum())
    lines.append("  legend: " + "  ".join(legend) if legend else "  legend: (no owners)")
    if n_shared:
        lines.append(f"  {n_shared} tree slots are also read by running requests "
                     "(their cached prefixes, shared in place)")
    return "\n".join(lines)


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


# ---- the demo tree that `radixkv viz` draws ----------------------------------------------------
class WordTokenizer:
    """A fallback tokenizer: words and punctuation, each with the whitespace before it.

    Ids are handed out on first sight, so `decode(encode(text)) == text` for any text this
    instance has encoded. Used when the default model's tokenizer is not available.
    """

    _PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in self._PIECE.findall(text):
            if piece not in self._ids:
                self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            out.append(self._ids[piece])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self._pieces[int(i)] for i in ids)
        except IndexError as exc:
            raise ConfigError(f"token id not in this WordTokenizer's vocabulary: {exc}") from exc

    def __len__(self) -> int:
        return len(self._pieces)


SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and precisely."
# Chat requests, in arrival order: (name, messages). Two share a user question's beginning, one
# conversation comes back for a second turn: the tree shows the shared system prompt, the split
# where the questions diverge, and the second turn extending the first.
DEMO_CHATS: list[tuple[str, list[dict[str, str]]]] = [
    ("alice-1", [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": "What is a radix tree?"}]),
    ("bob", [{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": "What is paged attention?"}]),
    ("alice-2", [{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": "What is a radix tree?"},
                 {"role": "assistant", "content": "A trie whose edges hold runs of tokens."},
                 {"role": "user", "content": "Why does it help LLM serving?"}]),
    ("carol", [{"role": "system", "content": SYSTEM_PROMPT},
               {"role": "user", "content": "Explain KV caching in one sentence."}]),
]
# Still running while the pictures are taken: its cached prefix is locked, its own slots are its.
DEMO_RUNNING = ("dave", [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": "What is a radix sort?"}])
DEMO_DECODED = 6  # tokens the running request has generated so far


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template when it has one, else 'role: text'."""
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template) and getattr(tokenizer, "chat_template", None):
        ids = template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return [int(i) for i in tokenizer.encode(text)]


def load_demo_tokenizer(kind: str = "auto") -> tuple[Any, str]:
    """(tokenizer, description). kind 'model': the default model's tokenizer (error if missing);
    'word': `WordTokenizer`; 'auto': the model's when it loads, else the word tokenizer."""
    if kind not in ("auto", "model", "word"):
        raise ConfigError(f"tokenizer kind must be auto, model or word, got {kind!r}")
    if kind == "word":
        return WordTokenizer(), "word tokenizer (radixkv.tools.viz.WordTokenizer)"
    try:
        from radixkv.model import load_tokenizer

        tok = load_tokenizer(None)
        return tok, f"default model tokenizer ({type(tok).__name__})"
    except Exception as exc:  # any failure to load falls back, and says why
        if kind == "model":
            raise ConfigError(f"the default model's tokenizer did not load: "
                              f"{type(exc).__name__}: {exc}") from exc
        return WordTokenizer(), (f"word tokenizer (the default model's tokenizer did not load: "
                                 f"{type(exc).__name__}: {exc})")


@dataclass
class DemoTree:
    """What `build_demo` made: the cache, its pool, the running request's slots, a step log."""

    cache: RadixCache
    pool: TokenToKVPool
    running: dict[str, Any]  # request name -> all slots it reads (CPU int64 tensor)
    prompts: dict[str, list[int]]
    log: list[str]


def _serve_demo(tokenizer: Any, num_slots: int, headroom: int | None) -> DemoTree:
    import torch

    from radixkv.memory import RadixCache, TokenToKVPool

    prompts = {name: encode_chat(tokenizer, msgs) for name, msgs in DEMO_CHATS}
    run_name, run_msgs = DEMO_RUNNING
    prompts[run_name] = encode_chat(tokenizer, run_msgs)
    pool = TokenToKVPool(num_slots, num_layers=1, num_kv_heads=1, head_dim=1)
    cache = RadixCache(pool)
    log = []

    def take(n: int) -> torch.Tensor:
        if pool.available_size() < n:  # as an engine does: evict LRU leaves to make room
            freed = cache.evict(n - pool.available_size())
            log.append(f"  pool short of {n} slots: evicted {freed} cached tokens (LRU leaves)")
        return pool.alloc(n)

    for name, _ in DEMO_CHATS:
        tokens = prompts[name]
        m = cache.match_prefix(tokens)
        slots = torch.cat([m.slots, take(len(tokens) - m.length)])
        k = cache.insert(tokens, slots)
        if k > m.length:  # someone cached part of it meanwhile: our copies are duplicates
            pool.free(slots[m.length:k])
        log.append(f"{name}: {len(tokens)} prompt tokens, {m.length} matched in the tree, "
                   f"{len(tokens) - m.length} new slots; finished and cached")
    if headroom is not None:
        return DemoTree(cache, pool, {}, prompts, log)
    tokens = prompts[run_name]
    m = cache.match_prefix(tokens)
    cache.lock(m.node)
    own = take(len(tokens) - m.length + DEMO_DECODED)
    log.append(f"req:{run_name}: {len(tokens)} prompt tokens, {m.length} matched (locked), "
               f"{len(own)} own slots ({len(tokens) - m.length} prompt + {DEMO_DECODED} "
               "generated so far); still running")
    return DemoTree(cache, pool, {f"req:{run_name}": torch.cat([m.slots, own])}, prompts, log)


def build_demo(tokenizer: Any, headroom: int = 8) -> DemoTree:
    """Serve `DEMO_CHATS` through a real RadixCache + TokenToKVPool; leave `DEMO_RUNNING` running.

    Each chat: match its prefix, allocate slots for the rest, insert the whole prompt (the tree
    now owns those slots). The pool is sized to what the finished chats cache plus `headroom`
    slots, so the running request must evict the least recently used leaf to get its slots, as
    an engine under memory pressure does; its own slots then land where the evicted ones were.
    It locks its matched prefix and holds its prompt and decode slots.
    """
    if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 0:
        raise ConfigError(f"headroom must be an integer >= 0, got {headroom!r}")
    # First pass on a roomy pool only measures how many tokens the finished chats cache.
    probe = _serve_demo(tokenizer, 1 << 16, headroom=0)
    return _serve_demo(tokenizer, probe.cache.total_size() + headroom, headroom=None)


def write_pictures(cache: RadixCache, out_dir: str | Path, tokenizer: Any = None,
                   running: Mapping[str, Any] | None = None, max_depth: int | None = None,
                   pool: TokenToKVPool | None = None) -> dict[str, Path]:
    """Write tree.txt, tree.dot, tree.png, memory_map.txt and memory_map.png into `out_dir`
    (and tree.svg when Graphviz's `dot` is installed). Returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mm = memory_map(cache, pool, running)
    files = {"tree.txt": out / "tree.txt", "tree.dot": out / "tree.dot",
             "memory_map.txt": out / "memory_map.txt"}
    files["tree.txt"].write_text(format_tree(cache, tokenizer, max_depth) + "\n")
    files["tree.dot"].write_text(to_dot(cache, tokenizer, max_depth))
    files["memory_map.txt"].write_text(format_memory_map(mm) + "\n")
    files["tree.png"] = render_tree_png(cache, out / "tree.png", tokenizer, max_depth)
    files["memory_map.png"] = render_memory_map_png(mm, out / "memory_map.png")
    dot = shutil.which("dot")
    if dot:
        svg = out / "tree.svg"
        done = subprocess.run([dot, "-Tsvg", str(files["tree.dot"]), "-o", str(svg)],
                              capture_output=True, timeout=60, check=False)
        if done.returncode == 0:
            files["tree.svg"] = svg
    return files
