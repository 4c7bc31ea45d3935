"""Plain-text drawing of a radix tree, on the tree's read-only walk (`roots()`, `walk()`, node
`tokens`, `value`, `lock_ref`, `last_access`, `hit_count`, `children`).

`format_tree` is what `RadixCache.pretty()` returns; the pictures in `radixkv.tools.viz` (DOT, PNG,
memory map) reuse its node names (n1, n2, ... in `walk()` order) and token labels, so every drawing
names the same node the same way. Nothing here imports above the memory level.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from radixkv.errors import ConfigError

if TYPE_CHECKING:
    from radixkv.memory.radix_cache import RadixCache, TreeNode

_DECODE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError)


def check_depth(max_depth: int | None) -> None:
    """`ConfigError` unless `max_depth` is None or an integer >= 1."""
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int)
                                  or max_depth < 1):
        raise ConfigError(f"max_depth must be None or an integer >= 1, got {max_depth!r}")


def check_tokenizer(tokenizer: Any) -> None:
    """`ConfigError` unless `tokenizer` is None or has a `decode(ids)` method."""
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(f"tokenizer must have a decode(ids) method, got {type(tokenizer)}")


def node_names(cache: RadixCache) -> dict[int, str]:
    """id(node) -> 'n1', 'n2', ... in `cache.walk()` order (the names every picture uses)."""
    return {id(node): f"n{i}" for i, (node, _) in enumerate(cache.walk(), start=1)}


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


def subtree_size(node: TreeNode) -> int:
    """Nodes below `node` (not counting it)."""
    count, stack = 0, list(node.children.values())
    while stack:
        n = stack.pop()
        count += 1
        stack.extend(n.children.values())
    return count


def root_label(namespace: Any) -> str:
    """How a namespace's root is labelled in every drawing."""
    return "root" if namespace is None else f"root (namespace {namespace!r})"


def format_tree(cache: RadixCache, tokenizer: Any = None, max_depth: int | None = None) -> str:
    """A text drawing of the tree, one node per line.

    Each line: name, tokens (decoded with `tokenizer.decode(ids)` when given), length, lock count,
    last access tick, hit count, KV slots. Nodes deeper than `max_depth` are summarised as
    '… N more nodes'. Raises `ConfigError` for a bad `max_depth` or tokenizer.
    """
    check_depth(max_depth)
    check_tokenizer(tokenizer)
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
            n = subtree_size(node)
            lines.append(f"{child_prefix}└─ … {n} more node{'s' * (n != 1)} below")
            return
        for i, child in enumerate(kids):
            visit(child, child_prefix, i == len(kids) - 1, depth + 1)

    for ns, root in roots.items():
        lines.append(root_label(ns))
        kids = list(root.children.values())
        for i, child in enumerate(kids):
            visit(child, "", i == len(kids) - 1, 1)
    return "\n".join(lines)
