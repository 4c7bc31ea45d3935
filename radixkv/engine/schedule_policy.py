"""Orders in which waiting requests are admitted.

- `fcfs`: arrival order.
- `lpm`: longest cached prefix first, so requests that share what is in the tree run while it is
  still there (arrival order breaks ties). Past `LPM_MAX_QUEUE` waiting requests the per-request
  lookups cost more than they save, and the order falls back to fcfs.
- `dfs-weight`: group requests by where their match ends in the tree, then walk the tree depth
  first, heavier subtrees (more waiting requests) first, so requests sharing a prefix run together.
"""

from __future__ import annotations

from collections import defaultdict

from radixkv.engine.request import Request
from radixkv.memory.base_cache import CacheNode, PrefixCache

POLICIES = ("lpm", "fcfs", "dfs-weight")
LPM_MAX_QUEUE = 256


def order_waiting(policy: str, waiting: list[Request], cache: PrefixCache) -> list[Request]:
    """The waiting requests in the order the scheduler should try to admit them."""
    if policy == "fcfs" or len(waiting) <= 1 or not cache.retains_slots:
        return list(waiting)
    if policy == "lpm":
        if len(waiting) > LPM_MAX_QUEUE:
            return list(waiting)
        hits = {id(r): cache.match_prefix(r.token_ids()[:-1], r.namespace, record=False).length
                for r in waiting}
        return sorted(waiting, key=lambda r: -hits[id(r)])  # stable: arrival order on ties
    return _dfs_weight_order(waiting, cache)


def _dfs_weight_order(waiting: list[Request], cache: PrefixCache) -> list[Request]:
    at_node: dict[int, list[Request]] = defaultdict(list)
    nodes: dict[int, CacheNode] = {}
    for r in waiting:
        node = cache.match_prefix(r.token_ids()[:-1], r.namespace, record=False).node
        at_node[id(node)].append(r)
        nodes[id(node)] = node
    weight: dict[int, int] = defaultdict(int)
    for key, reqs in at_node.items():  # each request weighs on its node and every ancestor
        node = nodes[key]
        while node is not None:
            weight[id(node)] += len(reqs)
            node = node.parent
    roots = {id(n): n for n in (_root_of(node) for node in nodes.values())}
    order: list[Request] = []
    stack = sorted(roots.values(), key=lambda n: weight[id(n)])  # heaviest popped first
    while stack:
        node = stack.pop()
        order.extend(at_node.get(id(node), ()))
        kids = [c for c in node.children.values() if weight[id(c)]]
        stack.extend(sorted(kids, key=lambda n: weight[id(n)]))
    return order


def _root_of(node: CacheNode) -> CacheNode:
    while node.parent is not None:
        node = node.parent
    return node
