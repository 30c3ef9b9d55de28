"""Per-stage breakdown of the plans each partitioner finds for the large-vocabulary model (diagnosis aid).

    python benchmarks/plan_breakdown.py                     # llama-vocab250k, 64 GPUs, 8 stages, both captures
    python benchmarks/plan_breakdown.py --gpus 8 --all      # every configuration tried, not only the best

For the whole-head and the split-head capture: every (pipeline ranks, replicas, schedule, microbatches)
configuration with each partitioner's estimate and simulated step time, then the best plan of each
partitioner stage by stage: blocks, parameters, forward/backward ms per microbatch, M x (f + b), the send to
the next stage, recompute, memory against the cap, and per-rank tails (data-parallel all-reduce not hidden,
tied all-reduce, optimizer). Same cost model and simulator as the planner.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plan_quality import GLOBAL_BATCH, models  # noqa: E402

import rannc_hf  # noqa: E402
from rannc_hf.capture.split_head import DEFAULT_MIN_OUT_FEATURES  # noqa: E402
from rannc_hf.planner.api import _as_graph  # noqa: E402
from rannc_hf.planner.costs import CostModel  # noqa: E402
from rannc_hf.planner.search import Searcher  # noqa: E402


def searcher(model, batch, gpus: int, stages: int, split) -> Searcher:
    g, B = _as_graph(model, batch, split=split)
    cl = rannc_hf.Cluster(num_gpus=gpus, gpus_per_node=8, gpu_memory="80GB", device="h100")
    cfg = rannc_hf.RanncConfig(num_stages=stages)
    cm = CostModel.build(g, cl.device, cfg.precision, max_blocks=256)
    cap = float(cl.gpu_memory_bytes) * (1.0 - cfg.mem_margin)
    return Searcher(cm, cl, cfg, gpu_memory=int(cap), global_batch=B)


def show(s: Searcher, c, label: str) -> None:
    sim = s._simulate(c)
    print(f"  [{label}] from {c.partitioner}: {c.S}pp x {c.dp}dp v={c.v} M={c.M} (mb {c.mb:g}) {c.schedule} "
          f"{'dp-inner' if c.dp_inner else 'pp-inner'}: est {c.est * 1e3:.1f} ms, simulated {sim.step_time * 1e3:.1f} ms "
          f"(pipeline {sim.pipeline_time * 1e3:.1f}, bubble {sim.bubble:.3f})")
    for i, (lo, hi) in enumerate(c.chunks):
        n, _, _ = s.cm.stage_params(lo, hi)
        print(f"    stage {i}: blocks {lo}-{hi} params {n / 1e6:.0f}M fwd {c.fwd[i] * 1e3:.3f} bwd {c.bwd[i] * 1e3:.3f} "
              f"M(f+b) {c.M * (c.fwd[i] + c.bwd[i]) * 1e3:.1f} send {c.p2p[i] * 1e3:.3f} "
              f"recompute {c.recompute[i]} mem {c.memory[i]['total'] / 2**30:.1f}/{s.cap / 2**30:.1f} GiB")
    print("    rank tails (ms):", [round(t * 1e3, 1) for t in c.tail])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--model", default="llama-vocab250k")
    ap.add_argument("--all", action="store_true", help="every configuration's numbers")
    args = ap.parse_args()
    model, batch = next((m, b) for n, m, b in models() if n == args.model)
    model.config.use_cache = False
    for split in (None, DEFAULT_MIN_OUT_FEATURES):
        s = searcher(model, batch, args.gpus, min(args.gpus, 8), split)
        print(f"== {args.model}, {args.gpus} GPUs, head {'split' if split else 'whole'}: {s.N} blocks, "
              f"global batch {GLOBAL_BATCH}")
        if args.all:
            for (S, v, dp, sch, M) in s.configs():
                a = s.cm.at(s.B / (dp * M))
                row = []
                for p in ("auto", "auto-cheap", "even", "params"):
                    if p == "auto":
                        ch = s.partition_auto(a, S, v, M, sch)
                    elif p == "auto-cheap":
                        ch = s.partition_auto(a, S, v, M, sch, s.cheap_cuts(a))
                    else:
                        ch = s.partition_even(S * v) if p == "even" else s.partition_params(S * v)
                    c = s.evaluate(p, ch, S, v, dp, M, sch) if ch and len(ch) == S * v else None
                    if c is None:
                        row.append(f"{p} -")
                        continue
                    s._simulate(c)
                    row.append(f"{p} {c.score * 1e3:.0f}")
                print(f"  {S}pp x {dp}dp v={v} {sch:16s} M={M:3d}: " + " | ".join(row) + " ms")
        for name, c in s.run().items():
            show(s, c, name)


if __name__ == "__main__":
    main()
