"""Which KV slot belongs to which tree node or running request, and a character grid of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from radixkv.errors import ConfigError, InvalidSlotError
from radixkv.memory.kv_pool import as_slot_array
from radixkv.memory.tree_text import node_names

if TYPE_CHECKING:
    from radixkv.memory import RadixCache, TokenToKVPool


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
