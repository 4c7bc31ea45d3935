"""Level 1 of the memory hierarchy: a radix tree of token sequences whose nodes hold KV slots.

Each node owns a run of tokens (`key`, int32 bytes) and the KV slots computed for them (`value`,
int64). A root per namespace keeps tenants apart. Requests lock the node their match ends at, which
pins it and its ancestors; unlocked leaves are evicted in LRU (or LFU) order and their slots go back
to the `TokenToKVPool`.

Invariants (`check_invariants` verifies every one of them):
- evictable_size + protected_size == total_size == tokens held by all nodes;
- a node's lock count is >= each child's (a lock covers the whole path to the root);
- len(key) == len(value) > 0, a multiple of page_size, for every non-root node;
- a child is stored under the key of its first page (the token itself for page_size 1, an xxhash
  of the page otherwise, the page's bytes if that hash collides with a sibling);
- no slot is held by two nodes, and every slot in the tree is allocated in the pool;
- the evictable-leaf index holds exactly the unlocked non-root nodes without children.

Costs: matching and inserting compare whole node keys as bytes (memcmp) and find a mismatch with
one scan (compiled, or vectorised numpy); there is no per-token Python loop. A match descends and
touches the path in one pass; an insert descends without changing anything, has the pool check
and adopt the new slots in one call, then changes the tree. Eviction pops from a sorted index of
evictable leaves kept up to date incrementally, in two parts. Under LRU a leaf that is used gets
the newest time, so it goes to the end of a recency list (an OrderedDict: O(1) to move, remove or
pop the oldest). A leaf that becomes evictable with an older time (unlocked, or a parent whose
last child went) and every LFU leaf go to a sorted index (O(log n) to add, remove or pop, its key
the node's `evict_key`). Eviction takes the older of the two heads: O(log n) per evicted node in
the worst case, O(1) for the common LRU case.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from itertools import count
from typing import Any

import numpy as np
import torch
import xxhash
from sortedcontainers import SortedDict

from radixkv.errors import InvalidSlotError, InvariantError, LockError
from radixkv.memory import native
from radixkv.memory.base_cache import (
    CacheNode,
    CacheStats,
    MatchResult,
    Namespace,
    PrefixCache,
    TokensLike,
    as_token_array,
    common_prefix_len,
)
from radixkv.memory.kv_pool import TokenToKVPool, as_slot_array
from radixkv.memory.tree_text import format_tree

_TOK = 4  # bytes per token in keys (int32)
_RECENT = "recent"  # TreeNode.evict_key of a leaf in the recency list (LRU, newest time)
_I32 = np.dtype(np.int32)
_EMPTY_SLOTS = np.empty(0, dtype=np.int64)


class TreeNode(CacheNode):
    """One edge of the radix tree: a run of tokens and their KV slots. Treat as read-only."""

    __slots__ = ("children", "parent", "key", "value", "child_key", "lock_ref", "last_access",
                 "hit_count", "evict_key", "namespace")

    def __init__(self, key: bytes, value: np.ndarray, parent: TreeNode | None,
                 child_key: Hashable, namespace: Namespace) -> None:
        self.children: dict[Hashable, TreeNode] = {}
        self.parent = parent
        self.key: bytes | None = key  # None once evicted
        self.value = value  # int64 slots, len == len(key) // 4
        self.child_key = child_key  # this node's key in parent.children
        self.lock_ref = 0
        self.last_access = 0
        self.hit_count = 0
        # Its key in the sorted evictable-leaf index, _RECENT when in the recency list, None
        # when it is not evictable.
        self.evict_key: Any = None
        self.namespace = namespace

    @property
    def tokens(self) -> np.ndarray:
        """Token ids of this node's run (a read-only int32 view)."""
        return np.frombuffer(self.key or b"", dtype=np.int32)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __len__(self) -> int:
        return len(self.value)

    def __repr__(self) -> str:
        return (f"TreeNode(len={len(self.value)}, lock_ref={self.lock_ref}, "
                f"children={len(self.children)}, last_access={self.last_access})")


def _first_mismatch(a: bytes, b: bytes) -> int:
    """Number of leading int32 tokens on which the keys `a` and `b` agree."""
    return common_prefix_len(np.frombuffer(a, dtype=np.int32), np.frombuffer(b, dtype=np.int32))


class RadixCache(PrefixCache):
    """Radix tree prefix cache over a `TokenToKVPool` (SGLang's RadixAttention semantics).

    Args:
        kv_pool: the pool whose slots the tree holds; evicted slots are freed into it.
        page_size: tokens per page; cached lengths are always multiples of it.
        eviction_policy: "lru" (least recently used leaf first) or "lfu" (fewest hits first,
            ties broken by recency).
    """

    retains_slots = True

    def __init__(self, kv_pool: TokenToKVPool, page_size: int = 1,
                 eviction_policy: str = "lru") -> None:
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if eviction_policy not in ("lru", "lfu"):
            raise ValueError(f"unknown eviction_policy {eviction_policy!r} (use 'lru' or 'lfu')")
        self.kv_pool = kv_pool
        self.page_size = page_size
        self.eviction_policy = eviction_policy
        self._page_bytes = page_size * _TOK
        self._roots: dict[Namespace, TreeNode] = {}
        self._null_root = TreeNode(b"", _EMPTY_SLOTS, None, None, None)  # handle for misses
        # Evictable leaves: (order key..., seq) -> node, for those not in the recency list.
        self._sorted = SortedDict()
        self._recent: OrderedDict[TreeNode, None] = OrderedDict()  # LRU leaves, oldest first
        self._recent_last = 0  # last_access of the newest leaf in _recent
        self._n_leaves = 0
        self._seq = count()
        self._tick = 0
        self._evictable = 0
        self._protected = 0
        self._node_count = 0
        self._query = self._hit = self._evicted = self._inserted = 0
        # Called as evict_hook(namespace, path_tokens, path_slots, leaf_start) for every leaf
        # about to be evicted, while its slots (and its ancestors') still hold its KV: the KV
        # tiers write evicted prefixes back this way.
        self.evict_hook: Callable[[Namespace, np.ndarray, np.ndarray, int], None] | None = None
        lib = native.lib()  # the compiled split-point scan, else numpy's (same results)
        self._c_mismatch = lib.rkv_mismatch if lib is not None else None
        self._lru = eviction_policy == "lru"

    # ---- public API -------------------------------------------------------------------------
    def match_prefix(self, tokens: TokensLike, namespace: Namespace = None, *,
                     record: bool = True) -> MatchResult:
        """Longest cached prefix of `tokens` under `namespace`.

        When the prefix ends inside a node, the node is split so the returned `node` ends exactly
        at `length`. Touches every node on the path (LRU time, hit count). `length` is a multiple
        of page_size and at most len(tokens). `record=False` leaves the query/hit counters of
        `stats()` alone (for an engine's own bookkeeping lookups, e.g. ordering its queue).
        """
        # tobytes() below copies any int32 vector in order, so only the dtype needs checking
        arr = tokens if (type(tokens) is np.ndarray and tokens.dtype is _I32
                         and tokens.ndim == 1) else as_token_array(tokens)
        total = len(arr)
        if record:
            self._query += total
        n = total // self.page_size * self.page_size
        root = self._roots.get(namespace)
        if root is None or n == 0:
            return MatchResult(torch.from_numpy(_EMPTY_SLOTS),
                               root if root is not None else self._null_root, 0)
        tb = arr[:n].tobytes() if n < total else arr.tobytes()
        # Descend and touch in one pass (nothing here can fail half-way).
        node, pos, values, tick = root, 0, [], self._tick
        page1 = self.page_size == 1
        children = root.children
        while pos < n and children:
            at = pos * _TOK
            child = children.get(tb[at:at + _TOK]) if page1 else self._get_child(node, tb, pos)
            if child is None:
                break
            key = child.key
            end = at + len(key)
            if tb[at:end] != key:
                cut = self._mismatch(key, tb[at:end]) // self.page_size * self.page_size
                if not cut:
                    break
                child = self._split(child, cut)
                end = at + cut * _TOK
            tick += 1
            child.last_access = tick
            if record:
                child.hit_count += 1
            if child.evict_key is not None:
                self._index_leaf(child)
            values.append(child.value)
            node, pos, children = child, end // _TOK, child.children
            if end - at != len(key):  # split: the match ends inside the old node
                break
        self._tick = tick
        if record:
            self._hit += pos
        # a copy either way: the caller must never alias the tree's arrays
        slots = values[0].copy() if len(values) == 1 else (
            np.concatenate(values) if values else _EMPTY_SLOTS)
        return MatchResult(torch.from_numpy(slots), node, pos)

    def insert(self, tokens: TokensLike, slots: Any, namespace: Namespace = None) -> int:
        """Cache the page-aligned part of `tokens` with `slots`; returns the cached length before.

        The tree adopts only the slots of the new suffix (positions >= the returned length); slots
        passed for positions that were already cached stay the caller's to free. Raises
        `InvalidSlotError` (changing nothing) if the lengths differ or a slot is not allocated.
        """
        arr = tokens if (type(tokens) is np.ndarray and tokens.dtype is _I32
                         and tokens.ndim == 1) else as_token_array(tokens)
        if type(slots) is torch.Tensor and slots.dtype == torch.int64:
            sl, n_slots = slots, slots.numel()  # the pool reads it in place
        else:
            sl = as_slot_array(slots)
            n_slots = sl.size
        total = len(arr)
        if n_slots != total:
            raise InvalidSlotError(f"insert: {total} tokens but {n_slots} slots")
        n = total // self.page_size * self.page_size
        if n == 0:
            return 0
        tb = arr[:n].tobytes() if n < total else arr.tobytes()
        root = self._roots.get(namespace)
        path, pos, partial, cut = self._descend(root, tb) if root is not None else ([], 0, None, 0)
        # Validate and adopt what the tree takes before changing the tree: a bad slot raises
        # with nothing changed, and nothing after this can fail.
        adopted = self.kv_pool._take(sl, pos, n) if pos < n else None
        if root is None:  # created only now: a failed insert leaves no empty tenant root
            root = self._root(namespace)
        tick = self._tick
        for node in path:  # an insert counts as a use of the whole path
            tick += 1
            node.last_access = tick
            if node.evict_key is not None:
                self._index_leaf(node)
        node = path[-1] if path else root
        if partial is not None:
            node = self._split(partial, cut)
            tick += 1
            node.last_access = tick
        if adopted is not None:
            leaf_key = tb[pos * _TOK:]
            ck = leaf_key[:_TOK] if self.page_size == 1 else self._free_child_key(node, leaf_key)
            leaf = TreeNode(leaf_key, adopted, node, ck, node.namespace)
            if node.evict_key is not None:  # node stops being a leaf
                self._unindex(node)
            node.children[ck] = leaf
            self._node_count += 1
            self._evictable += n - pos
            self._inserted += n - pos
            tick += 1
            leaf.last_access = tick
            self._index_leaf(leaf)
        self._tick = tick
        return pos

    def lock(self, node: TreeNode) -> None:
        """Pin `node` and its ancestors against eviction (reference counted; roots are no-ops)."""
        if node.key is None:
            raise LockError("lock of a node that was evicted")
        while node.parent is not None:
            if node.lock_ref == 0:
                size = len(node.value)
                self._evictable -= size
                self._protected += size
                if node.evict_key is not None:
                    self._unindex(node)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`; raises `LockError` (changing nothing) if it is not locked."""
        if node.parent is None:
            return
        if node.key is None or node.lock_ref <= 0:
            raise LockError(f"unlock of a node that is not locked (lock_ref={node.lock_ref})")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                size = len(node.value)
                self._evictable += size
                self._protected -= size
                if not node.children:
                    self._index_leaf(node)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves (whole nodes) until `num_tokens` are freed.

        A parent becomes a candidate once its last child is gone. Stops early when nothing is
        evictable; returns the number of tokens freed (may exceed `num_tokens`).
        """
        freed = nodes = 0
        released: list[np.ndarray] = []
        ordered, recent = self._sorted, self._recent
        while freed < num_tokens and self._n_leaves:
            if recent and (not ordered or next(iter(recent)).last_access
                           <= ordered.peekitem(0)[0][0]):
                node = recent.popitem(last=False)[0]
            else:
                node = ordered.popitem(0)[1]
            node.evict_key = None
            self._n_leaves -= 1
            if self.evict_hook is not None:
                self._report_eviction(node)
            parent = node.parent
            del parent.children[node.child_key]
            value = node.value
            released.append(value)
            freed += len(value)
            nodes += 1
            node.key = None
            if parent.parent is not None:
                if not parent.children and parent.lock_ref == 0:
                    self._index_leaf(parent)
            elif not parent.children and parent.namespace is not None:
                del self._roots[parent.namespace]  # drop empty tenant roots
        if released:  # distinct and allocated by the tree's invariants (check_invariants verifies)
            if nodes == 1:
                self.kv_pool._release(released[0])
            else:
                self.kv_pool._release_parts(released, freed)
        self._evictable -= freed
        self._node_count -= nodes
        self._evicted += freed
        return freed

    def _report_eviction(self, node: TreeNode) -> None:
        """Hand the evicted leaf, with its whole root path (tokens, slots), to `evict_hook`."""
        keys, values = [], []
        n: TreeNode | None = node
        while n is not None and n.parent is not None:
            keys.append(n.key or b"")
            values.append(n.value)
            n = n.parent
        tokens = np.frombuffer(b"".join(reversed(keys)), dtype=np.int32)
        slots = np.concatenate(values[::-1])
        self.evict_hook(node.namespace, tokens, slots, len(tokens) - len(node.value))

    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (O(1))."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens in locked nodes (O(1))."""
        return self._protected

    def total_size(self) -> int:
        """Tokens cached in the tree (O(1))."""
        return self._evictable + self._protected

    def stats(self) -> CacheStats:
        """Query, hit, evicted and inserted token counts, node count and sizes."""
        return CacheStats(self._query, self._hit, self._evicted, self._inserted, self._node_count,
                          self.total_size(), self._evictable, self._protected)

    def clear(self) -> None:
        """Drop every node (freeing its slots into the pool) and zero the counters.

        Raises `LockError` while any node is locked: a running request still reads those slots.
        """
        if self._protected:
            raise LockError(f"clear while {self._protected} cached tokens are locked")
        slots = self.cached_slots()
        if slots.size:
            self.kv_pool._release(slots)
        for node, _ in self.walk():
            node.key = None
        self._roots.clear()
        self._sorted.clear()
        self._recent.clear()
        self._recent_last = self._n_leaves = 0
        self._tick = self._evictable = self._protected = self._node_count = 0
        self._query = self._hit = self._evicted = self._inserted = 0

    def walk(self) -> Iterator[tuple[TreeNode, int]]:
        """Every non-root node with its depth (1 = child of a root), depth first."""
        stack = [(child, 1) for root in self._roots.values() for child in root.children.values()]
        stack.reverse()
        while stack:
            node, depth = stack.pop()
            yield node, depth
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))

    def roots(self) -> dict[Namespace, TreeNode]:
        """The root of each namespace that holds something (read-only view)."""
        return dict(self._roots)

    def cached_slots(self) -> np.ndarray:
        """Every slot held by the tree (int64, tree order)."""
        values = [node.value for node, _ in self.walk()]
        return np.concatenate(values) if values else _EMPTY_SLOTS.copy()

    def pretty(self, tokenizer: Any = None, max_depth: int | None = None) -> str:
        """A text drawing of the tree (see `radixkv.memory.tree_text.format_tree`)."""
        return format_tree(self, tokenizer=tokenizer, max_depth=max_depth)

    def check_invariants(self) -> None:
        """Walk the tree; raise `InvariantError` naming the first broken invariant."""
        def fail(msg: str) -> None:
            raise InvariantError(f"RadixCache invariant broken: {msg}")

        evictable = protected = nodes = 0
        leaves: set[int] = set()
        values = []
        times = [n.last_access for n in self._recent]
        if times != sorted(times) or (times and times[-1] > self._recent_last):
            fail("the recency list is out of order")
        for ns, root in self._roots.items():
            if root.parent is not None or root.namespace != ns or len(root.value):
                fail(f"root of namespace {ns!r} is malformed")
        for node, _ in self.walk():
            nodes += 1
            if node.key is None:
                fail("an evicted node is still in the tree")
            size = len(node.value)
            if size == 0 or len(node.key) != size * _TOK:
                fail(f"node has {len(node.key) // _TOK} tokens but {size} slots")
            if size % self.page_size:
                fail(f"node length {size} is not a multiple of page_size {self.page_size}")
            parent = node.parent
            if parent.children.get(node.child_key) is not node:
                fail("node is not stored in its parent under its child key")
            first = node.key[:self._page_bytes]
            if node.child_key not in (self._hash_key(first), first):
                fail("child key does not match the node's first page")
            if node.lock_ref < 0:
                fail(f"negative lock count {node.lock_ref}")
            if parent.parent is not None and parent.lock_ref < node.lock_ref:
                fail(f"parent lock {parent.lock_ref} < child lock {node.lock_ref}")
            if node.namespace != parent.namespace:
                fail("node and parent are in different namespaces")
            if node.lock_ref == 0:
                evictable += size
            else:
                protected += size
            is_leaf = node.lock_ref == 0 and not node.children
            entry = node.evict_key
            if is_leaf != (entry is not None) or (is_leaf and (
                    node not in self._recent if entry is _RECENT else (
                        self._sorted.get(entry) is not node
                        or entry[:-1] != self._order_key(node)))):
                fail("evictable-leaf index is out of date")
            if is_leaf:
                leaves.add(id(node))
            values.append(node.value)
        if not len(leaves) == len(self._sorted) + len(self._recent) == self._n_leaves:
            fail(f"evictable-leaf index holds {len(self._sorted) + len(self._recent)} nodes ("
                 f"{self._n_leaves}), "
                 f"tree has {len(leaves)}")
        if (evictable, protected) != (self._evictable, self._protected):
            fail(f"counters say evictable={self._evictable} protected={self._protected}, "
                 f"tree has {evictable} and {protected}")
        if nodes != self._node_count:
            fail(f"node counter {self._node_count} != {nodes} nodes")
        slots = np.concatenate(values) if values else _EMPTY_SLOTS
        if np.unique(slots).size != slots.size:
            fail("a slot is held by two nodes")
        if slots.size and (slots.min() < 1 or slots.max() > self.kv_pool.num_slots):
            fail("a cached slot is outside the pool")
        if self.kv_pool.is_free(slots).any():
            fail("a cached slot is marked free in the pool")
        if self.kv_pool.num_cache_held() != slots.size:
            fail(f"the pool marks {self.kv_pool.num_cache_held()} slots as cache-held, the tree "
                 f"holds {slots.size}")

    # ---- internals --------------------------------------------------------------------------
    def _root(self, namespace: Namespace) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = TreeNode(b"", _EMPTY_SLOTS, None, None, namespace)
            self._roots[namespace] = root
        return root

    def _hash_key(self, page: bytes) -> Hashable:
        # page_size 1: the 4-byte token itself is the key; larger pages: a 64-bit hash of the page.
        return page if self.page_size == 1 else xxhash.xxh3_64_intdigest(page)

    def _get_child(self, node: TreeNode, tb: bytes, pos: int) -> TreeNode | None:
        if self.page_size == 1:  # hot path: the token's 4 bytes are the key, no collisions
            return node.children.get(tb[pos * _TOK:pos * _TOK + _TOK])
        page = tb[pos * _TOK:pos * _TOK + self._page_bytes]
        child = node.children.get(self._hash_key(page))
        if child is None or child.key[:self._page_bytes] != page:
            # No child under the hash, or one whose page differs (a collision): a page that
            # collided with a sibling when it was inserted is stored under its bytes, and stays
            # there even after that sibling is evicted.
            child = node.children.get(page)
        return child

    def _free_child_key(self, node: TreeNode, key: bytes) -> Hashable:
        page = key[:self._page_bytes]
        hashed = self._hash_key(page)
        return page if hashed in node.children else hashed

    def _order_key(self, node: TreeNode) -> tuple[int, ...]:
        return (node.last_access,) if self._lru else (node.hit_count, node.last_access)

    def _unindex(self, node: TreeNode) -> None:
        """Take an indexed leaf out of the evictable-leaf index (it got locked or a child)."""
        if node.evict_key is _RECENT:
            del self._recent[node]
        else:
            del self._sorted[node.evict_key]
        node.evict_key = None
        self._n_leaves -= 1

    def _index_leaf(self, node: TreeNode) -> None:
        """(Re)enter an evictable leaf under its current order key."""
        if self._lru:
            if not self._recent or node.last_access >= self._recent_last:  # newest: at the end
                if node.evict_key is _RECENT:
                    self._recent.move_to_end(node)
                else:
                    if node.evict_key is None:
                        self._n_leaves += 1
                    else:
                        del self._sorted[node.evict_key]
                    node.evict_key = _RECENT
                    self._recent[node] = None
                self._recent_last = node.last_access
                return
            key: tuple[Any, ...] = (node.last_access, next(self._seq))
        else:
            key = (node.hit_count, node.last_access, next(self._seq))
        if node.evict_key is None:
            self._n_leaves += 1
        else:
            self._unindex(node)
            self._n_leaves += 1
        node.evict_key = key
        self._sorted[key] = node

    def _mismatch(self, a: bytes, b: bytes) -> int:
        """Number of leading tokens on which two keys agree."""
        if self._c_mismatch is not None:
            return self._c_mismatch(a, b, min(len(a), len(b)) // _TOK)
        return _first_mismatch(a, b)

    def _descend(self, root: TreeNode, tb: bytes
                 ) -> tuple[list[TreeNode], int, TreeNode | None, int]:
        """Follow `tb` down from `root` without changing anything.

        Returns (fully matched nodes along the path, matched length in tokens, the node the
        match ends inside of or None, how many of its tokens match).
        """
        node, pos, n = root, 0, len(tb) // _TOK
        path: list[TreeNode] = []
        page1 = self.page_size == 1
        while pos < n:
            if page1:
                child = node.children.get(tb[pos * _TOK:pos * _TOK + _TOK])
            else:
                child = self._get_child(node, tb, pos)
            if child is None:
                break
            size = len(child.value)
            seg = tb[pos * _TOK:(pos + size) * _TOK]
            if seg == child.key:
                path.append(child)
                node, pos = child, pos + size
                continue
            cut = self._mismatch(child.key, seg) // self.page_size * self.page_size
            if cut:
                return path, pos + cut, child, cut
            break
        return path, pos, None, 0

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut `child` after `m` tokens; returns the new upper node (same lock count)."""
        parent = child.parent
        upper = TreeNode(child.key[:m * _TOK], child.value[:m], parent, child.child_key,
                         child.namespace)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.hit_count = child.hit_count
        parent.children[child.child_key] = upper
        child.key = child.key[m * _TOK:]
        child.value = child.value[m:]
        child.parent = upper
        child.child_key = self._hash_key(child.key[:self._page_bytes])
        upper.children[child.child_key] = child
        self._node_count += 1
        return upper

    def __repr__(self) -> str:
        return (f"RadixCache(nodes={self._node_count}, total={self.total_size()}, "
                f"evictable={self._evictable}, protected={self._protected}, "
                f"page_size={self.page_size}, policy={self.eviction_policy})")
