"""Where a training step's GPU memory goes, measured, next to the planner's memory model for the same step.

Plain eager PyTorch (bf16 autocast, fused AdamW, one micro-batch), as ``single_gpu.py``'s ``plain``: the
allocated bytes at each phase boundary, the peak inside forward, backward and the optimizer step, and, from the
CUDA caching allocator's history of the second step, the allocations alive at the step's peak grouped by the
Python line that made them (backward's allocations have no Python frame: they group as ``autograd``). The
planner's figures for the same model and batch (``rannc_hf.plan``, one stage, no offload, no recompute) sit
beside them.

    python benchmarks/memory_probe.py --model bert-large --microbatch 32 16
    python benchmarks/memory_probe.py --model gpt2-2.7b --microbatch 8
    python benchmarks/memory_probe.py --model bert-large --microbatch 16 --rannc none optimizer:24GiB:0

Writes ``memory_probe_<model>.json`` under ``$OUT`` (or benchmarks/results/). Needs a CUDA GPU for the
measured half; on CPU it prints the planner's half only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

GiB = 2**30
SIZES = {"bert-large": "bert-large", "gpt2-1.3b": "1.3b", "gpt2-2.7b": "2.7b"}


def predicted(model_name: str, mb: int) -> dict:
    import rannc_hf
    from single_gpu import build

    with torch.device("meta"):
        model, cfg, seq = build(SIZES[model_name], "meta")
    ids = torch.randint(0, cfg.vocab_size, (mb, seq))
    p = rannc_hf.plan(model, {"input_ids": ids, "labels": ids},
                      cluster=rannc_hf.Cluster(num_gpus=1, gpu_memory="141GB", device="h200"),
                      config=rannc_hf.RanncConfig(num_stages=1, precision="bf16", compile="false", offload="none",
                                                  recompute="none", num_microbatches=1), progress=False)
    s = p.stages[0]
    return {"peak_gib": s.peak_bytes / GiB, **{k + "_gib": v / GiB for k, v in s.memory.items()
                                                if isinstance(v, (int, float))}}


def _site(frames: list) -> str:
    for f in frames:
        if f.get("fx_node_name"):   # RanncModule's captured graph: the aten op's node, numbering dropped
            return "fx:" + f["fx_node_name"].rstrip("0123456789").rstrip("_")
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in ("transformers/", "torch/nn/functional", "torch/optim", "torch/nn/modules")):
            return f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}"
    return "autograd" if not frames else f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')}"


def live_at_peak(snapshot: dict) -> tuple[float, list]:
    """(peak bytes allocated during the recorded trace above what was alive when it began, [(site, bytes)] of
    those allocations alive at that moment, largest first)."""
    live, cur, peak, at_peak = {}, 0, 0, {}
    for ev in snapshot["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _site(ev.get("frames") or []))
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] in ("free_completed",) and ev["addr"] in live:
            cur -= live.pop(ev["addr"])[0]
    by_site = collections.Counter()
    for size, site in at_peak.values():
        by_site[site] += size
    return peak, by_site.most_common(25)


def measured_rannc(model_name: str, mb: int, offload: str, cap: str, gpu_step_blocks: str) -> dict:
    """The same step through RanncModule (eager, one stage, one micro-batch, no recompute, ``offload``, ``cap``)."""
    from single_gpu import build

    from rannc_hf import RanncConfig, RanncModule

    model, cfg, seq = build(SIZES[model_name], "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (mb, seq))
    m = RanncModule(model, opt, example_batch={"input_ids": ids, "labels": ids},
                    config=RanncConfig(num_stages=1, precision="bf16", compile="false", offload=offload,
                                       recompute="none", num_microbatches=1, gpu_memory=cap,
                                       gpu_step_blocks=gpu_step_blocks if gpu_step_blocks == "auto"
                                       else int(gpu_step_blocks)))
    ids = ids.to(m.device)

    def step():
        loss = m(input_ids=ids, labels=ids)
        (loss.loss if hasattr(loss, "loss") else loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    a0 = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    error = None
    try:   # two steps recorded: the first allocates the optimizer's state; an out-of-memory is a result too
        step()
        step()
        torch.cuda.synchronize()
    except Exception as e:
        error = repr(e)[:1500]
    snap = torch.cuda.memory._snapshot(augment_with_fx_traces=True)
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, sites = live_at_peak(snap)
    plan = m.plan.stages[0]
    return {"offload": offload, "cap": cap, "gpu_step_blocks": gpu_step_blocks, "error": error, "start_gib": a0 / GiB,
            "max_allocated_gib": torch.cuda.max_memory_allocated() / GiB, "trace_peak_gib": (a0 + peak) / GiB,
            "plan_peak_gib": plan.peak_bytes / GiB,
            "plan_memory_gib": {k: v / GiB for k, v in plan.memory.items() if isinstance(v, (int, float))},
            "alive_at_peak_by_site_gib": [(s_, b / GiB) for s_, b in sites]}


def measured(model_name: str, mb: int) -> dict:
    from single_gpu import build

    dev = torch.device("cuda")
    model, cfg, seq = build(SIZES[model_name], dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (mb, seq), device=dev)
    phases = {}

    def step(record: bool):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        a0 = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        fwd_peak, a1 = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        bwd_peak, a2 = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        opt_peak, a3 = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        if record:
            phases.update({"start_gib": a0 / GiB, "after_forward_gib": a1 / GiB, "after_backward_gib": a2 / GiB,
                           "after_step_gib": a3 / GiB, "forward_peak_gib": fwd_peak / GiB,
                           "backward_peak_gib": bwd_peak / GiB, "step_peak_gib": opt_peak / GiB})

    step(False)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(True)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, sites = live_at_peak(snap)
    del model, opt
    torch.cuda.empty_cache()
    return {**phases, "trace_peak_gib": phases["start_gib"] + peak / GiB,
            "alive_at_peak_by_site_gib": [(s, b / GiB) for s, b in sites]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-large", choices=list(SIZES))
    ap.add_argument("--microbatch", type=int, nargs="+", default=[32])
    ap.add_argument("--rannc", nargs="*", default=[], metavar="OFFLOAD[:CAP[:GPU_STEP_BLOCKS]]",
                    help="also through RanncModule, e.g. none optimizer:24GiB:0 (eager, one micro-batch)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    res = {"model": args.model, "cases": []}
    for mb in args.microbatch:
        row = {"microbatch": mb, "predicted": predicted(args.model, mb)}
        if torch.cuda.is_available():
            row["measured"] = measured(args.model, mb)
            for spec in args.rannc:
                off, cap, gsb = (spec.split(":") + [None, "auto"])[:3]
                try:
                    row.setdefault("rannc", []).append(measured_rannc(args.model, mb, off, cap or None, gsb))
                except Exception as e:   # an out-of-memory is a result too
                    row.setdefault("rannc", []).append({"offload": off, "cap": cap, "error": repr(e)[:2000]})
                    torch.cuda.memory._record_memory_history(enabled=None)
                import gc

                gc.collect()   # the module's hooks and engine hold cycles: free its GPU memory before the next
                torch.cuda.empty_cache()
        res["cases"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    from benchmarks.common import write_result

    print("wrote", write_result(f"memory_probe_{args.model}", res, out_dir=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
