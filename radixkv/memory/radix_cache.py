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
one vectorised scan; there is no per-token Python loop. Eviction pops from a sorted index of
evictable leaves kept up to date incrementally, O(log n) per evicted node.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import torch
import xxhash
from sortedcontainers import SortedDict

from radixkv.errors import InvalidSlotError, InvariantError, LockError
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
        self.evict_key: Any = None  # key in the evictable-leaf index, None when not in it
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
        self._leaves = SortedDict()  # evict_key -> node, for unlocked leaves
        self._tick = 0
        self._evictable = 0
        self._protected = 0
        self._node_count = 0
        self._query = self._hit = self._evicted = self._inserted = 0
        # Called as evict_hook(namespace, path_tokens, path_slots, leaf_start) for every leaf
        # about to be evicted, while its slots (and its ancestors') still hold its KV: the KV
        # tiers write evicted prefixes back this way.
        self.evict_hook: Callable[[Namespace, np.ndarray, np.ndarray, int], None] | None = None

    # ---- public API -------------------------------------------------------------------------
    def match_prefix(self, tokens: TokensLike, namespace: Namespace = None, *,
                     record: bool = True) -> MatchResult:
        """Longest cached prefix of `tokens` under `namespace`.

        When the prefix ends inside a node, the node is split so the returned `node` ends exactly
        at `length`. Touches every node on the path (LRU time, hit count). `length` is a multiple
        of page_size and at most len(tokens). `record=False` leaves the query/hit counters of
        `stats()` alone (for an engine's own bookkeeping lookups, e.g. ordering its queue).
        """
        arr = as_token_array(tokens)
        if record:
            self._query += len(arr)
        n = len(arr) // self.page_size * self.page_size
        root = self._roots.get(namespace)
        if root is None or n == 0:
            return MatchResult(torch.from_numpy(_EMPTY_SLOTS),
                               root if root is not None else self._null_root, 0)
        tb = arr[:n].tobytes()
        path, length, partial, cut = self._descend(root, tb)
        node, values = self._apply(root, path, partial, cut, count_hit=record)
        if record:
            self._hit += length
        # a copy either way: the caller must never alias the tree's arrays
        slots = values[0].copy() if len(values) == 1 else (
            np.concatenate(values) if values else _EMPTY_SLOTS)
        return MatchResult(torch.from_numpy(slots), node, length)

    def insert(self, tokens: TokensLike, slots: Any, namespace: Namespace = None) -> int:
        """Cache the page-aligned part of `tokens` with `slots`; returns the cached length before.

        The tree adopts only the slots of the new suffix (positions >= the returned length); slots
        passed for positions that were already cached stay the caller's to free. Raises
        `InvalidSlotError` (changing nothing) if the lengths differ or a slot is not allocated.
        """
        arr = as_token_array(tokens)
        sl = as_slot_array(slots)
        if len(sl) != len(arr):
            raise InvalidSlotError(f"insert: {len(arr)} tokens but {len(sl)} slots")
        n = len(arr) // self.page_size * self.page_size
        if n == 0:
            return 0
        sl = sl[:n]
        tb = arr[:n].tobytes()
        root = self._roots.get(namespace)
        path, pos, partial, cut = self._descend(root, tb) if root is not None else ([], 0, None, 0)
        if pos < n:  # validate what the tree would adopt before changing anything
            self.kv_pool._check_used(sl[pos:], distinct=True)
        if root is None:  # created only now: a failed insert leaves no empty tenant root
            root = self._root(namespace)
        node, _ = self._apply(root, path, partial, cut, count_hit=False)
        if pos < n:
            adopted = sl[pos:].copy()
            self.kv_pool._adopt(adopted)
            leaf_key = tb[pos * _TOK:]
            leaf = TreeNode(leaf_key, adopted, node, self._free_child_key(node, leaf_key),
                            node.namespace)
            self._attach(node, leaf)
            self._inserted += n - pos
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
                    del self._leaves[node.evict_key]
                    node.evict_key = None
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
        freed = 0
        released: list[np.ndarray] = []
        leaves = self._leaves
        while freed < num_tokens and leaves:
            _, node = leaves.popitem(0)
            node.evict_key = None
            if self.evict_hook is not None:
                self._report_eviction(node)
            parent = node.parent
            del parent.children[node.child_key]
            size = len(node.value)
            released.append(node.value)
            freed += size
            self._evictable -= size
            self._node_count -= 1
            node.key = None
            if parent.parent is not None:
                if not parent.children and parent.lock_ref == 0:
                    self._index_leaf(parent)
            elif not parent.children and parent.namespace is not None:
                del self._roots[parent.namespace]  # drop empty tenant roots
        if released:  # distinct and allocated by the tree's invariants (check_invariants verifies)
            self.kv_pool._release(released[0] if len(released) == 1 else np.concatenate(released))
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
        self._leaves.clear()
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

        evictable = protected = count = 0
        leaves: set[int] = set()
        values = []
        for ns, root in self._roots.items():
            if root.parent is not None or root.namespace != ns or len(root.value):
                fail(f"root of namespace {ns!r} is malformed")
        for node, _ in self.walk():
            count += 1
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
            if is_leaf != (node.evict_key is not None) or (
                    is_leaf and self._leaves.get(node.evict_key) is not node):
                fail("evictable-leaf index is out of date")
            if is_leaf:
                leaves.add(id(node))
            values.append(node.value)
        if len(leaves) != len(self._leaves):
            fail(f"evictable-leaf index holds {len(self._leaves)} nodes, tree has {len(leaves)}")
        if (evictable, protected) != (self._evictable, self._protected):
            fail(f"counters say evictable={self._evictable} protected={self._protected}, "
                 f"tree has {evictable} and {protected}")
        if count != self._node_count:
            fail(f"node counter {self._node_count} != {count} nodes")
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

    def _touch(self, node: TreeNode, count_hit: bool) -> None:
        self._tick += 1
        node.last_access = self._tick
        if count_hit:
            node.hit_count += 1
        if node.evict_key is not None:
            del self._leaves[node.evict_key]
            self._index_leaf(node)

    def _index_leaf(self, node: TreeNode) -> None:
        key = node.last_access if self.eviction_policy == "lru" else (
            node.hit_count, node.last_access)
        if key in self._leaves:  # two leaves share a tick only after a split; order them apart
            self._tick += 1
            node.last_access = self._tick
            key = node.last_access if self.eviction_policy == "lru" else (
                node.hit_count, node.last_access)
        node.evict_key = key
        self._leaves[key] = node

    def _descend(self, root: TreeNode, tb: bytes
                 ) -> tuple[list[TreeNode], int, TreeNode | None, int]:
        """Follow `tb` down from `root` without changing anything.

        Returns (fully matched nodes along the path, matched length in tokens, the node the
        match ends inside of or None, how many of its tokens match).
        """
        node, pos, n = root, 0, len(tb) // _TOK
        path: list[TreeNode] = []
        while pos < n:
            child = self._get_child(node, tb, pos)
            if child is None:
                break
            size = len(child.value)
            seg = tb[pos * _TOK:(pos + size) * _TOK]
            if seg == child.key:
                path.append(child)
                node, pos = child, pos + size
                continue
            cut = _first_mismatch(child.key, seg) // self.page_size * self.page_size
            if cut:
                return path, pos + cut, child, cut
            break
        return path, pos, None, 0

    def _apply(self, root: TreeNode, path: list[TreeNode], partial: TreeNode | None, cut: int,
               count_hit: bool) -> tuple[TreeNode, list[np.ndarray]]:
        """Touch the matched path (LRU time, hits) and split `partial` after `cut` tokens.

        Returns the node the match ends at and the slot arrays along the path.
        """
        for node in path:
            self._touch(node, count_hit)
        values = [node.value for node in path]
        node = path[-1] if path else root
        if partial is not None:
            node = self._split(partial, cut)
            self._touch(node, count_hit)
            values.append(node.value)
        return node, values

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

    def _attach(self, parent: TreeNode, leaf: TreeNode) -> None:
        if parent.evict_key is not None:  # parent stops being a leaf
            del self._leaves[parent.evict_key]
            parent.evict_key = None
        parent.children[leaf.child_key] = leaf
        self._node_count += 1
        self._evictable += len(leaf.value)
        self._touch(leaf, count_hit=False)
        self._index_leaf(leaf)

    def __repr__(self) -> str:
        return (f"RadixCache(nodes={self._node_count}, total={self.total_size()}, "
                f"evictable={self._evictable}, protected={self._protected}, "
                f"page_size={self.page_size}, policy={self.eviction_policy})")
