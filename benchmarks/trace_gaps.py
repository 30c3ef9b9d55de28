"""Is a profiled step waiting on the GPU or on the host? GPU busy time, idle gaps, and what the host was doing.

Reads a ``torch.profiler`` Chrome trace (``.json`` or ``.json.gz``, as ``offload_profile.py`` and
``multi_gpu.py run --profile`` write them) and reports, over the span from the first to the last GPU activity:
the time some kernel, copy or memset ran (the union over all streams), the idle rest, the number of kernels, and
the idle time grouped by the host operation that was running when each gap began: the outermost one (which
phase: a module's forward, ``autograd::engine::evaluate_function: ...`` in backward, the optimizer) and the
innermost one (which call). Gaps shorter than ``--min-gap-us`` are launch latency and are summed, not attributed.

``--inside OP`` instead breaks down the host time of every call of one host op (on whichever thread runs it): its
mean duration, the part no child op covers (Python, hooks), and its direct children per call. That is how the
offload engine's gradient hook was found to take 290 us per gradient on BERT-large's backward thread.

    python benchmarks/trace_gaps.py out/next45/results/m2/trace_rannc.json.gz
    python benchmarks/trace_gaps.py TRACE --top 20 --json gaps.json
    python benchmarks/trace_gaps.py TRACE --inside torch::autograd::AccumulateGrad
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from typing import Optional

_GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_events(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union(intervals: list) -> list:
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def _launch_thread(events: list):
    """The host threads that launch kernels, most launches first: the training loop's, and autograd's device thread,
    which launches the backward's kernels."""
    counts = defaultdict(int)
    for e in events:
        if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", ""):
            counts[(e.get("pid"), e.get("tid"))] += 1
    return [k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1])]


def analyze(events: list, min_gap_us: float = 20.0, top: int = 12) -> dict:
    """Busy/idle summary of ``events`` (Chrome trace events, times in microseconds)."""
    gpu = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
           if e.get("ph") == "X" and e.get("cat") in _GPU_CATS]
    if not gpu:
        raise ValueError("no GPU activity in the trace (a CPU-only profile?): nothing to analyze")
    busy = _union(gpu)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(b - a for a, b in busy)
    threads = set(_launch_thread(events))
    ops = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"])
                 for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function")
                 and (e.get("pid"), e.get("tid")) in threads)
    outer, inner = defaultdict(float), defaultdict(float)
    small = 0.0
    n_gaps = 0
    active, j = [], 0   # sweep: the host ops of the launching threads that cover the current gap's start
    for (_, end), (nxt, _) in zip(busy, busy[1:]):
        gap = nxt - end
        if gap < min_gap_us:
            small += gap
            continue
        n_gaps += 1
        while j < len(ops) and ops[j][0] <= end:
            active.append(ops[j])
            j += 1
        active = [o for o in active if o[1] > end]
        if active:   # outermost = longest (a phase annotation, a backward node), innermost = shortest (the call)
            outer[max(active, key=lambda o: o[1] - o[0])[2]] += gap
            inner[min(active, key=lambda o: o[1] - o[0])[2]] += gap
        else:
            outer["(no host op)"] += gap
            inner["(no host op)"] += gap
    kernels = sum(1 for e in events if e.get("ph") == "X" and e.get("cat") == "kernel")

    def top_of(d):
        return [(k, round(v / 1e3, 3)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"span_ms": span / 1e3, "gpu_busy_ms": busy_us / 1e3, "gpu_idle_ms": (span - busy_us) / 1e3,
            "busy_fraction": busy_us / span if span else 0.0, "kernels": kernels,
            "idle_in_short_gaps_ms": small / 1e3, "long_gaps": n_gaps, "min_gap_us": min_gap_us,
            "idle_by_outer_host_op_ms": top_of(outer), "idle_by_inner_host_op_ms": top_of(inner)}


def inside(events: list, op: str, top: int = 12) -> dict:
    """Host time of the calls of host op ``op`` (Chrome trace events, microseconds): calls, mean and percentile
    durations, the mean time no direct child covers, and per direct child its time and count per call."""
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") not in _GPU_CATS]
    calls = [e for e in host if e.get("name") == op]
    if not calls:
        raise ValueError(f"no host op named {op!r} in the trace")
    by_thread: dict = defaultdict(list)
    for e in host:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
    children: dict = defaultdict(lambda: [0, 0.0])
    uncovered = 0.0
    for c in calls:
        t0, t1 = float(c["ts"]), float(c["ts"]) + float(c.get("dur", 0))
        covered_to = t0
        for e in by_thread[(c.get("pid"), c.get("tid"))]:
            a = float(e["ts"])
            if e is c or a < t0 or (a == t0 and float(e.get("dur", 0)) > t1 - t0):   # itself, or an op around it
                continue
            if a >= t1:
                break
            if a >= covered_to:   # a direct child: not inside the previous child
                b = min(t1, a + float(e.get("dur", 0)))
                children[e["name"]][0] += 1
                children[e["name"]][1] += b - a
                uncovered += a - covered_to
                covered_to = b
        uncovered += max(0.0, t1 - covered_to)
    n = len(calls)
    durs = sorted(float(c.get("dur", 0)) for c in calls)
    kids = sorted(children.items(), key=lambda kv: -kv[1][1])[:top]
    return {"op": op, "calls": n, "mean_us": sum(durs) / n, "p50_us": durs[n // 2], "p90_us": durs[(9 * n) // 10],
            "uncovered_us_per_call": uncovered / n,
            "children_per_call": [(k, round(v[1] / n, 3), round(v[0] / n, 3)) for k, v in kids]}


def summarize_trace(path: str, min_gap_us: float = 20.0, top: int = 12) -> Optional[dict]:
    """:func:`analyze` of the Chrome trace at ``path``; ``None`` when it recorded no GPU activity (a CPU run)."""
    try:
        return analyze(load_events(path), min_gap_us, top)
    except ValueError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--inside", default=None, metavar="OP", help="break down the host time of host op OP instead")
    args = ap.parse_args(argv)
    try:
        events = load_events(args.trace)
        res = inside(events, args.inside, args.top) if args.inside else analyze(events, args.min_gap_us, args.top)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    res["trace"] = args.trace
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
