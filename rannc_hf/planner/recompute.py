"""Where a stage is cut into checkpointed segments for activation recompute, and what that costs in memory.

    >>> import numpy as np
    >>> from rannc_hf.planner.recompute import choose_boundaries
    >>> saved = np.array([4.0, 4, 4, 4, 4, 4])           # activations autograd keeps, per block
    >>> cross = np.array([1.0, 6, 1, 6, 1])             # bytes crossing the cut after blocks 0..4
    >>> b = choose_boundaries(cross, saved, inflight=1)  # cut where little crosses: 0, 2, 4
    >>> b.boundaries, b.kept_bytes, b.max_segment_bytes
    ([0, 2, 4], 3.0, 8.0)

A stage recomputed as segments keeps, per microbatch in flight, the values crossing each segment
boundary (the checkpoints) and, during backward, one segment's activations at a time. The planner
prices a stage with :func:`choose_boundaries` over its coarsened blocks and records the chosen cuts in
the plan (``StagePlan.recompute_starts``); the runtime checkpoints exactly those segments
(:class:`rannc_hf.runtime.stages.StageModule`), so prediction and execution agree. Without a plan the
runtime applies the same rule to single ops.

The rule: for a threshold ``t``, cut wherever at most ``t`` bytes cross, or at every k-th of those places
(the checkpoints are fewer, the segments longer); among a few thresholds (the quantiles of the crossing
sizes) and thinnings, and no cut at all, take the one with the least peak ``inflight * kept + max segment``. For a transformer the cheap cuts are the residual stream between
sub-layers, which is what hand-written layer checkpointing picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = 16
THIN = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Segmentation:
    boundaries: list[int]         #: positions j: a segment ends after element j
    kept_bytes: float             #: bytes crossing the boundaries (kept per microbatch in flight)
    max_segment_bytes: float      #: the largest segment's activations (alive while it recomputes)

    def peak(self, inflight: float) -> float:
        return inflight * self.kept_bytes + self.max_segment_bytes


def _evaluate(mask: np.ndarray, cross: np.ndarray, prefix: np.ndarray) -> Segmentation:
    b = np.flatnonzero(mask)
    edges = np.concatenate(([-1], b, [len(prefix) - 2]))
    seg = prefix[edges[1:] + 1] - prefix[edges[:-1] + 1]
    return Segmentation(b.tolist(), float(cross[b].sum()), float(seg.max()) if len(seg) else 0.0)


def choose_boundaries(cross, saved, inflight: float = 1.0) -> Segmentation:
    """Segment boundaries for elements (blocks or ops) with activations ``saved[i]`` and ``cross[j]`` bytes
    crossing the cut after element ``j`` (``len(cross) == len(saved) - 1``; ``inf`` marks a cut that is not
    allowed)."""
    saved = np.asarray(saved, dtype=np.float64)
    cross = np.asarray(cross, dtype=np.float64)
    prefix = np.concatenate(([0.0], np.cumsum(saved)))
    best = _evaluate(np.zeros(len(cross), dtype=bool), cross, prefix)
    finite = cross[np.isfinite(cross)]
    if finite.size == 0:
        return best
    for t in np.unique(np.quantile(finite, np.linspace(0.0, 1.0, QUANTILES))):
        cuts = np.flatnonzero(cross <= t)
        for k in THIN:   # every k-th of those cuts: fewer checkpoints kept, longer segments
            if k > 1 and k > len(cuts):
                break
            mask = np.zeros(len(cross), dtype=bool)
            mask[cuts[k - 1::k]] = True
            cand = _evaluate(mask, cross, prefix)
            if cand.peak(inflight) < best.peak(inflight):
                best = cand
    return best
