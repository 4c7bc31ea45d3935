"""Node colours shared by the DOT and PNG drawings: red = locked (a running request reads it),
green = evictable leaf (the next eviction candidates), blue = unlocked inner node."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixkv.memory import TreeNode

LOCKED, EVICTABLE, INNER, ROOT = "#f4b6b6", "#bfe3bf", "#cfe0f5", "#e4e4e4"


def node_colour(node: TreeNode) -> str:
    """Red when locked, green for an evictable leaf, blue for an unlocked inner node."""
    if node.lock_ref > 0:
        return LOCKED
    return INNER if node.children else EVICTABLE
