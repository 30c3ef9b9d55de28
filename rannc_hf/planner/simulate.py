"""Pipeline schedule simulator: step time and bubble of GPipe, 1F1B and interleaved 1F1B.

    >>> from rannc_hf.planner.simulate import simulate
    >>> r = simulate([1.0, 1.0], [2.0, 2.0], microbatches=4, schedule="1f1b")
    >>> r.step_time, round(r.bubble, 3)         # (M + S - 1) * (f + b) for equal stages
    (15.0, 0.2)
    >>> simulate([1.0] * 4, [2.0] * 4, 8, "interleaved-1f1b", virtual_stages=2).step_time < \\
    ...     simulate([2.0] * 2, [4.0] * 2, 8, "1f1b").step_time
    True

Inputs are per *chunk* (pipeline stage as in ``Plan.stages``): forward and backward seconds per
microbatch, and the seconds to send a boundary tensor to the next chunk (the same for its gradient
coming back). Chunk ``c`` runs on rank ``c % R`` where ``R = len(fwd) / virtual_stages``. Each
rank executes its tasks in the schedule's order (the orders of ``torch.distributed.pipelining``),
a task starting when the rank is free and its input has arrived. After a rank's last backward,
its tail (data-parallel gradient all-reduce not hidden behind that backward, tied-weight
all-reduce, optimizer or offload step) runs; the step ends when every rank has finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class SimResult:
    step_time: float                    #: seconds per optimizer step
    pipeline_time: float                #: seconds until the last backward finishes
    bubble: float                       #: idle fraction of ranks during the pipeline phase
    rank_busy: list[float]              #: compute seconds per rank
    timeline: list[tuple[int, float, float, str, int, int]] = field(default_factory=list)
    #: (rank, start, end, "F"/"B", microbatch, chunk)


def ring_allreduce_time(nbytes: float, n: int, bw: float, latency: float = 0.0) -> float:
    """Ring all-reduce: ``2 (n - 1) / n * bytes / bw`` plus ``2 (n - 1)`` latencies."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * latency


def _orders(schedule: str, R: int, v: int, M: int) -> list[list[tuple[str, int, int]]]:
    """Per rank: its tasks ("F"/"B", microbatch, local chunk) in execution order."""
    orders = []
    for r in range(R):
        if schedule == "gpipe":
            seq = [("F", m, 0) for m in range(M)] + [("B", m, 0) for m in range(M)]
        elif schedule == "interleaved-1f1b" and v > 1:
            fwd = []
            bwd = []
            for g0 in range(0, M, R):
                grp = list(range(g0, min(M, g0 + R)))
                for j in range(v):
                    fwd += [("F", m, j) for m in grp]
                for j in reversed(range(v)):
                    bwd += [("B", m, j) for m in grp]
            warm = min(len(fwd), 2 * (R - r - 1) + (v - 1) * R)
            seq = fwd[:warm]
            fi, bi = warm, 0
            while fi < len(fwd) or bi < len(bwd):
                if fi < len(fwd):
                    seq.append(fwd[fi]); fi += 1
                if bi < len(bwd):
                    seq.append(bwd[bi]); bi += 1
        else:  # 1f1b
            warm = min(M, R - r - 1)
            seq = [("F", m, 0) for m in range(warm)]
            fi, bi = warm, 0
            while fi < M or bi < M:
                if fi < M:
                    seq.append(("F", fi, 0)); fi += 1
                if bi < M:
                    seq.append(("B", bi, 0)); bi += 1
        orders.append(seq)
    return orders


def simulate(fwd: Sequence[float], bwd: Sequence[float], microbatches: int, schedule: str = "1f1b",
             p2p: Optional[Sequence[float]] = None, virtual_stages: int = 1, tail: Optional[Sequence[float]] = None,
             keep_timeline: bool = False) -> SimResult:
    """Simulate one training step; ``tail[r]`` is what rank ``r`` does after its last backward."""
    C = len(fwd)
    v = virtual_stages if schedule == "interleaved-1f1b" else 1
    if C % v:
        raise ValueError(f"{C} chunks do not divide into {v} virtual stages per rank")
    R = C // v
    M = int(microbatches)
    p2p = list(p2p) if p2p is not None else [0.0] * C
    orders = _orders(schedule, R, v, M)
    done_f: dict[tuple[int, int], float] = {}
    done_b: dict[tuple[int, int], float] = {}
    clock = [0.0] * R
    pos = [0] * R
    busy = [0.0] * R
    timeline = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(R):
            seq = orders[r]
            while pos[r] < len(seq):
                kind, m, j = seq[pos[r]]
                c = j * R + r
                if kind == "F":
                    if c == 0:
                        ready = 0.0
                    else:
                        t = done_f.get((c - 1, m))
                        if t is None:
                            break
                        ready = t + p2p[c - 1]
                    dur = fwd[c]
                else:
                    if c == C - 1:
                        t = done_f.get((c, m))
                        if t is None:
                            break
                        ready = t
                    else:
                        t = done_b.get((c + 1, m))
                        if t is None:
                            break
                        ready = t + p2p[c]
                    dur = bwd[c]
                start = max(clock[r], ready)
                end = start + dur
                clock[r] = end
                busy[r] += dur
                (done_f if kind == "F" else done_b)[(c, m)] = end
                if keep_timeline:
                    timeline.append((r, start, end, kind, m, c))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - orders are deadlock-free by construction
            raise RuntimeError(f"schedule {schedule} deadlocked in the simulator")
    pipe = max(clock)
    tails = list(tail) if tail is not None else [0.0] * R
    step = max(clock[r] + tails[r] for r in range(R))
    bubble = 1.0 - sum(busy) / (R * pipe) if pipe > 0 else 0.0
    return SimResult(step, pipe, bubble, busy, timeline)


def estimate(fwd: Sequence[float], bwd: Sequence[float], microbatches: int, schedule: str = "1f1b",
             p2p: Optional[Sequence[float]] = None, virtual_stages: int = 1,
             tail: Optional[Sequence[float]] = None) -> float:
    """Closed-form step time (fast, used to rank candidates before :func:`simulate` scores the best)."""
    C = len(fwd)
    v = virtual_stages if schedule == "interleaved-1f1b" else 1
    R = C // v
    M = microbatches
    p2p = list(p2p) if p2p is not None else [0.0] * C
    rank_t = [0.0] * R
    for c in range(C):
        rank_t[c % R] += fwd[c] + bwd[c]
    bottleneck = max(rank_t)
    comm = max(p2p) * 2 if p2p else 0.0
    bottleneck = max(bottleneck, comm)
    fill = sum(fwd[c] + bwd[c] for c in range(C)) / v + 2 * sum(p2p[:-1])
    pipe = (M - 1) * bottleneck + max(fill, bottleneck)
    if tail is None:
        return pipe
    # rank r finishes its last backward roughly when the gradients stop flowing through the earlier ranks
    best = pipe
    back = 0.0
    for r in range(R):
        best = max(best, pipe - back + tail[r])
        back += bwd[r] / v + p2p[r]
    return best
