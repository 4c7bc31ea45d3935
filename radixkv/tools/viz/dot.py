"""The radix tree as a Graphviz DOT digraph (same node names and labels as the text tree)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from radixkv.memory.tree_text import (
    check_depth,
    check_tokenizer,
    node_names,
    root_label,
    subtree_size,
    token_text,
)
from radixkv.tools.viz.colours import ROOT, node_colour

if TYPE_CHECKING:
    from radixkv.memory import RadixCache, TreeNode


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(cache: RadixCache, tokenizer: Any = None, max_depth: int | None = None) -> str:
    """The tree as a Graphviz DOT digraph (render with `dot -Tpng tree.dot -o tree.png`)."""
    check_depth(max_depth)
    check_tokenizer(tokenizer)
    names = node_names(cache)
    out = ["digraph radix_cache {",
           '  graph [rankdir=TB, fontname="Helvetica", labelloc=t, '
           'label="radix tree: red = locked, green = evictable leaf, blue = inner node"];',
           '  node [shape=box, style="rounded,filled", fontname="Courier", fontsize=10];',
           "  edge [arrowsize=0.6];"]
    for r, (ns, root) in enumerate(cache.roots().items()):
        rid = f"root{r}"
        out.append(f'  {rid} [label="{_dot_escape(root_label(ns))}", fillcolor="{ROOT}"];')
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
                out.append(f'  {more} [label="… {subtree_size(node)} more", shape=plaintext, '
                           'style=""];')
                out.append(f"  {name} -> {more} [style=dashed];")
                continue
            stack.extend((c, name, depth + 1) for c in reversed(kids))
    out.append("}")
    return "\n".join(out) + "\n"
