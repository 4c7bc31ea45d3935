"""The two optima a run's achieved hit rate is compared with, on exactly the same accounting.

Accounting (the engine's): request j with prompt P_j (L_j tokens) counts as hit the length h_j
of the cached prefix of P_j[:-1] at its first admission; the last prompt token is always computed
(its logits give the first output token). Hit rate = sum h_j / sum L_j. When j finishes, the KV of
S_j = (P_j + O_j)[:-1] exists (O_j: its output; the last output token never gets KV). A token
"node" is a token prefix: the node at depth d of sequence x is x[:d]. A node is *materialized*
when some request computes its KV: by prefill (depths <= L_j of S_j) or by decode (depths in
(L_j, |S_j|]).

1. Infinite-cache bound (`infinite_bound`), the same for every order and capacity:
   every request computes its last prompt token (N tokens), and every node of the set
       D = {nodes on some P_i[:-1]} - {full prompts P_k} - {decode nodes of any S_j}
   can only be materialized by the prefill of a request whose P[:-1] holds it, so the first such
   request misses it. Hence computed >= N + |D| ("unique prefix tokens") and
       hit tokens <= sum (L_i - 1) - |D|;      bound = 1 - (N + |D|) / sum L_i.
   Serving requests by prompt length with an unbounded cache attains it, so it is what an
   unbounded cache could have served.

2. Offline optimum at the run's capacity C in the run's own admission order (`belady`). It is the
   exact optimum of a relaxed model in which the real run is one feasible schedule, so
   achieved <= belady holds by construction, and belady <= the infinite bound because it only
   serves materialized nodes. The model:
   - Time is the sequence of first admissions ("instants"), in the run's order.
   - At instant k (in engine step s), U_k = nodes of S_j[:kv_j] for the requests j running after
     step s-1 (their KV exists; every one of them counts as a hit, free). L_k = the same for
     those not preempted during step s, a lower bound of the slots the running requests hold.
   - The cache is a set K_k of further nodes with |K_k| + |L_k| <= C (the pool holds the tree
     and the running requests' own slots, C in all). A node can enter K_k only at an instant
     where it was freshly materialized (computed, held by a running request, or finished since
     the previous instant) or right after an instant whose query reached it; otherwise it must
     have been in K_{k-1}. The capacity is checked at instants only, not between them.
   - The query at instant k hits the nodes of P_i[:-1] in K_k or U_k.
   Each potential hit of node v at instant q is then an interval [a, q] (a = the last instant at
   which v could enter the cache) occupying one slot at every instant of it; the intervals of
   one node are disjoint, so the optimum is a maximum packing of unit intervals under the
   capacity profile C - |L_k|, which the earliest-right-end greedy (Belady's farthest-next-use
   rule, `pack_intervals`) solves exactly. Why the real run is feasible: its tree at an instant
   minus U_k fits beside L_k, only ever gains nodes its requests computed, and its hit for the
   admitted request is a path in the tree, a subset of K_k and U_k. (Several admissions in one
   engine step share the tree of the first one, which holds the later ones' hits.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radixkv.bench.runlog import RunLog

_EMPTY = np.zeros(0, np.int64)


# ---- token prefix trie ---------------------------------------------------------------------------
def prefix_node_ids(seqs: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Node id (>= 1) of every token position of every sequence, flat in concatenation order.

    Position d of sequence x gets the id of the prefix x[:d + 1]; equal prefixes get equal ids.
    Built depth by depth with one `np.unique` per depth. Returns (ids int64 [sum len], #nodes).
    """
    lens = np.array([len(s) for s in seqs], np.int64)
    total = int(lens.sum())
    if total == 0:
        return _EMPTY.copy(), 0
    flat = np.concatenate(seqs).astype(np.int64)
    offsets = np.zeros(len(seqs), np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    order = np.argsort(-lens, kind="stable")  # longest first: live rows at depth d are a prefix
    sorted_lens = lens[order]
    ids = np.empty(total, np.int64)
    cur = np.zeros(len(seqs), np.int64)  # node id at the current depth, per row of `order`
    next_id = 1
    for d in range(int(sorted_lens[0])):
        live = int(np.searchsorted(-sorted_lens, -d, side="left"))  # rows with len > d
        pos = offsets[order[:live]] + d
        key = (cur[:live] << 32) | flat[pos]
        uniq, inv = np.unique(key, return_inverse=True)
        new = next_id + inv.astype(np.int64)
        next_id += len(uniq)
        ids[pos] = new
        cur[:live] = new
    return ids, next_id - 1


def working_set(seqs: list[np.ndarray]) -> int:
    """Distinct token prefixes over the sequences: the KV slots an unbounded cache would hold."""
    return prefix_node_ids(seqs)[1]


@dataclass(frozen=True)
class InfiniteBound:
    hit_tokens: int  # sum (L_i - 1) - |D|
    unique_prefix_tokens: int  # N + |D|: tokens any schedule must compute
    prompt_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def infinite_bound(sequences: list[np.ndarray], prompt_lens: np.ndarray) -> InfiniteBound:
    """The infinite-cache bound of the module docstring. `sequences[i]` is S_i (it starts with
    P_i and is at least L_i long), `prompt_lens[i]` is L_i."""
    lens = np.array([len(s) for s in sequences], np.int64)
    prompt_lens = np.asarray(prompt_lens, np.int64)
    if (lens < prompt_lens).any() or (prompt_lens < 1).any():
        raise ValueError("each sequence must hold its whole prompt (at least one token)")
    ids, _ = prefix_node_ids(sequences)
    depth0 = np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens)  # position in its seq
    plen = np.repeat(prompt_lens, lens)
    in_query = depth0 < plen - 1  # nodes of P_i[:-1]
    free = depth0 >= plen - 1  # full prompt node and decode nodes
    d = np.setdiff1d(np.unique(ids[in_query]), np.unique(ids[free]), assume_unique=True)
    n, total = len(sequences), int(prompt_lens.sum())
    return InfiniteBound(int((prompt_lens - 1).sum()) - len(d), n + len(d), total)


# ---- pairwise longest common prefixes ------------------------------------------------------------
class LcpIndex:
    """LCP of any two sequences in O(1): lexicographic ranks plus a sparse table of the LCPs of
    neighbours in sorted order (the LCP of two sequences is the minimum over the neighbours
    between them)."""

    def __init__(self, seqs: list[np.ndarray]) -> None:
        self.lens = np.array([len(s) for s in seqs], np.int64)
        n = len(seqs)
        # big-endian bytes sort like the token sequences (a prefix sorts before its extensions)
        keys = [np.asarray(s, dtype=">u4").tobytes() for s in seqs]
        order = sorted(range(n), key=keys.__getitem__)
        self.rank = np.empty(n, np.int64)
        self.rank[order] = np.arange(n)
        adj = np.zeros(max(n - 1, 1), np.int64)
        for r in range(n - 1):
            a, b = seqs[order[r]], seqs[order[r + 1]]
            m = min(len(a), len(b))
            diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
            adj[r] = int(diff[0]) if diff.size else m
        levels = [adj]
        width = 1
        while 2 * width <= len(adj):
            prev = levels[-1]
            levels.append(np.minimum(prev[:-width], prev[width:]))
            width *= 2
        # one padded table [levels, n - 1]: a single fancy index answers a batch of queries
        self._table = np.full((len(levels), len(adj)), np.iinfo(np.int64).max, np.int64)
        for k, row in enumerate(levels):
            self._table[k, :len(row)] = row

    def lcp(self, i: int, js: np.ndarray) -> np.ndarray:
        """LCP of sequence i with each sequence in js (int64 array)."""
        js = np.asarray(js, np.int64)
        ri, rj = self.rank[i], self.rank[js]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        span = np.maximum(hi - lo, 1)
        k = np.log2(span).astype(np.int64)  # floor: span is a positive integer
        last = self._table.shape[1] - 1  # lo == hi (same sequence) may be the last rank
        res = np.minimum(self._table[k, np.minimum(lo, last)],
                         self._table[k, np.maximum(hi - (1 << k), 0)])
        return np.where(hi == lo, self.lens[js], res)

    def union_size(self, js: np.ndarray, ns: np.ndarray) -> int:
        """Number of distinct nodes in the union of the prefixes S_j[:n_j]."""
        js, ns = np.asarray(js, np.int64), np.asarray(ns, np.int64)
        total = 0
        for t in range(len(js)):
            if ns[t] <= 0:
                continue
            overlap = 0
            if t:
                common = np.minimum(np.minimum(self.lcp(int(js[t]), js[:t]), ns[:t]), ns[t])
                overlap = int(common.max())
            total += int(ns[t]) - overlap
        return total


# ---- offline optimum -----------------------------------------------------------------------------
def pack_intervals(lefts: np.ndarray, rights: np.ndarray, weights: np.ndarray,
                   capacity: np.ndarray) -> np.ndarray:
    """Most unit intervals packed under a capacity profile: interval group g holds weights[g]
    identical intervals covering instants lefts[g]..rights[g] (inclusive); at every instant t at
    most capacity[t] chosen intervals may overlap. Earliest right end first (shorter first on
    ties), each group taking as many copies as fit, is optimal. Returns copies taken per group."""
    rem = np.array(capacity, np.int64, copy=True)
    taken = np.zeros(len(lefts), np.int64)
    order = np.lexsort((-np.asarray(lefts), np.asarray(rights)))
    for g in order.tolist():
        a, q, w = int(lefts[g]), int(rights[g]), int(weights[g])
        room = int(rem[a:q + 1].min())
        t = min(w, room)
        if t > 0:
            rem[a:q + 1] -= t
            taken[g] = t
    return taken


@dataclass(frozen=True)
class BeladyResult:
    hit_tokens: int
    forced_tokens: int  # hits on KV held by running requests
    kept_tokens: int  # hits from the optimal cache contents
    reach_tokens: int  # hits an unbounded cache would give in this order
    prompt_tokens: int
    achieved_within_reach: bool  # each achieved hit only used materialized tokens (a sanity check)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _Entries:
    """Nodes S_j[:n] available at instant k, as (k, j, n) rows; a row that a later row of the same
    request dominates (later instant, at least as deep) is overwritten, so there are about as many
    rows as requests (more only after preemptions cut a request's KV)."""

    def __init__(self) -> None:
        self.k = np.zeros(1024, np.int64)
        self.j = np.zeros(1024, np.int64)
        self.n = np.zeros(1024, np.int64)
        self.size = 0
        self._newest: dict[int, int] = {}  # j -> row of its latest entry

    def add(self, k: int, items: dict[int, int]) -> None:
        for j, n in items.items():
            row = self._newest.get(j)
            if row is None or self.n[row] > n:
                if self.size == len(self.k):
                    for name in ("k", "j", "n"):
                        old = getattr(self, name)
                        setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
                row = self.size
                self.size += 1
                self._newest[j] = row
            self.k[row], self.j[row], self.n[row] = k, j, n


def belady(log: RunLog, index: LcpIndex | None = None) -> BeladyResult:
    """The offline optimum of the module docstring for this run (same order, same capacity)."""
    idx = index if index is not None else LcpIndex(log.sequences)
    seq_lens = np.array([len(s) for s in log.sequences], np.int64)
    instants = log.admissions
    n_inst = len(instants)
    cap = np.zeros(n_inst, np.int64)
    entries = _Entries()
    lefts: list[int] = []
    rights: list[int] = []
    weights: list[int] = []
    forced_total = reach_total = 0
    within = True
    union_cache: dict[int, int] = {}
    prev_step = 1
    prev_query: tuple[int, int] | None = None
    for k, (step, i) in enumerate(instants):
        # nodes that became available since the previous instant
        fresh: dict[int, int] = {}
        if step > prev_step or k == 0:
            for s in range(max(prev_step - 1, 0), step - 1):  # snapshots before U_k's
                for j, kv in log.snapshots[s]:
                    if kv > fresh.get(j, 0):
                        fresh[j] = kv
            for s in range(prev_step, step):
                for j in log.finished[s]:
                    fresh[j] = int(seq_lens[j])
        if prev_query is not None and prev_query[1] > fresh.get(prev_query[0], 0):
            fresh[prev_query[0]] = prev_query[1]
        entries.add(k, fresh)
        prev_step = step
        # running requests' KV at this instant: free hits (U) and capacity floor (L)
        snap = log.snapshots[step - 1]
        if step not in union_cache:
            gone = set(log.preempted[step])
            kept = [(j, kv) for j, kv in snap if j not in gone]
            union_cache[step] = idx.union_size(np.array([j for j, _ in kept], np.int64),
                                               np.array([kv for _, kv in kept], np.int64))
        cap[k] = log.capacity - union_cache[step]
        ell = int(log.prompt_lens[i]) - 1
        forced = 0
        if snap:
            js = np.array([j for j, _ in snap], np.int64)
            kvs = np.array([kv for _, kv in snap], np.int64)
            forced = int(np.minimum(idx.lcp(i, js), kvs).max())
        forced = min(forced, ell)
        # last instant at which each deeper node of P_i[:-1] could have entered the cache
        size = entries.size
        reach = forced
        if size and ell > forced:
            vals = np.minimum(idx.lcp(i, entries.j[:size]), entries.n[:size])
            best = np.zeros(k + 1, np.int64)  # deepest node available at each instant
            np.maximum.at(best, entries.k[:size], vals)
            suffix = np.maximum.accumulate(best[::-1])[::-1]  # deepest available at or after
            nxt = np.r_[suffix[1:], 0]
            lo = np.maximum(nxt, forced)
            hi = np.minimum(suffix, ell)
            for t in np.flatnonzero(hi > lo).tolist():  # depths (lo, hi] enter at instant t
                lefts.append(t)
                rights.append(k)
                weights.append(int(hi[t] - lo[t]))
            reach = max(forced, min(int(suffix[0]), ell))
        if log.hits[i] > reach:
            within = False
        forced_total += forced
        reach_total += reach
        prev_query = (i, reach)
    if (cap < 0).any():
        raise AssertionError("running requests hold more KV than the pool has: bad log")
    taken = pack_intervals(np.array(lefts, np.int64), np.array(rights, np.int64),
                           np.array(weights, np.int64), cap)
    kept = int(taken.sum())
    total = int(log.prompt_lens.sum())
    return BeladyResult(forced_total + kept, forced_total, kept, reach_total, total, within)
