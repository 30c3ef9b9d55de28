"""Coarsen a captured op sequence into blocks: contiguous op ranges that end only at valid cuts.

    >>> from rannc_hf.capture import capture
    >>> from rannc_hf.zoo import make
    >>> g = capture(*make("gpt2", batch_size=4))
    >>> blocks = coarsen(g, max_blocks=16)
    >>> blocks[0][0], blocks[-1][1] == len(g.ops) - 1, len(blocks) <= 16
    (0, True, True)

Step 1 makes *atomic* blocks: maximal runs of ops between valid cut positions (so every block
boundary is a legal stage boundary). Step 2 merges adjacent blocks until at most ``max_blocks`` are
left, cheapest pair first, where a pair inside one layer (same ``module`` prefix up to the first
numeric index, e.g. ``transformer.h.3``) costs half as much, so blocks follow layers when they can.
The planner partitions this block chain into stages, which keeps the search fast for 100B models.
"""

from __future__ import annotations

import heapq
import re
from typing import Optional, Sequence

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_key(module: str) -> str:
    """``"transformer.h.3.attn.c_attn"`` -> ``"transformer.h.3"``; modules without an index keep 2 levels."""
    m = _LAYER.match(module or "")
    if m:
        return m.group(1)
    return ".".join((module or "").split(".")[:2])


def atomic_blocks(valid_cuts: Sequence[bool], n_ops: int) -> list[tuple[int, int]]:
    """Maximal op runs whose last op is a valid cut (or the last op)."""
    blocks = []
    start = 0
    for i in range(n_ops):
        if i == n_ops - 1 or valid_cuts[i]:
            blocks.append((start, i))
            start = i + 1
    return blocks


def coarsen(graph, max_blocks: int = 256, op_cost: Optional[Sequence[float]] = None) -> list[tuple[int, int]]:
    """Block op ranges (inclusive) covering every op once, in order; at most ``max_blocks`` of them."""
    n = len(graph.ops)
    blocks = atomic_blocks(graph.valid_cuts, n)
    if len(blocks) <= max_blocks:
        return blocks
    if op_cost is None:
        op_cost = [max(1.0, float(sum(t.numel for t in op.outputs))) for op in graph.ops]
    prefix = [0.0]
    for c in op_cost:
        prefix.append(prefix[-1] + float(c))
    keys = [(layer_key(graph.ops[a].module), layer_key(graph.ops[b].module)) for a, b in blocks]

    # doubly linked list of live blocks + a heap of candidate merges (lazy deletion)
    lo = [a for a, _ in blocks]
    hi = [b for _, b in blocks]
    first_key = [k[0] for k in keys]
    last_key = [k[1] for k in keys]
    nxt = list(range(1, len(blocks))) + [-1]
    prv = [-1] + list(range(len(blocks) - 1))
    alive = [True] * len(blocks)
    version = [0] * len(blocks)
    total = prefix[-1] or 1.0

    def pair_cost(i: int, j: int) -> float:
        c = (prefix[hi[j] + 1] - prefix[lo[i]]) / total
        same = last_key[i] == first_key[j] and first_key[i] == last_key[j]
        return c * (0.5 if same else 1.0)

    heap = [(pair_cost(i, nxt[i]), i, version[i], version[nxt[i]]) for i in range(len(blocks) - 1)]
    heapq.heapify(heap)
    count = len(blocks)
    while count > max_blocks and heap:
        _, i, vi, vj = heapq.heappop(heap)
        j = nxt[i] if alive[i] else -1
        if j < 0 or not alive[i] or version[i] != vi or version[j] != vj:
            continue
        hi[i] = hi[j]
        last_key[i] = last_key[j]
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        version[i] += 1
        count -= 1
        if nxt[i] >= 0:
            heapq.heappush(heap, (pair_cost(i, nxt[i]), i, version[i], version[nxt[i]]))
        p = prv[i]
        if p >= 0:
            heapq.heappush(heap, (pair_cost(p, i), p, version[p], version[i]))
    return [(lo[i], hi[i]) for i in range(len(blocks)) if alive[i]]


def describe(graph, lo: int, hi: int) -> str:
    """Human name of an op range: ``"transformer.h.0 .. transformer.h.5"``."""
    keys = [layer_key(graph.ops[i].module) for i in (lo, hi)]
    named = [k for k in keys if k]
    if not named:
        return f"ops {lo}-{hi}"
    return named[0] if len(set(named)) == 1 else f"{named[0]} .. {named[-1]}"
