"""Where does the analytic cost model miss? Predicted vs measured GPU time by kind of work, one model at a time.

For each ``SIZE:MICROBATCH`` (the sizes of ``single_gpu.py``: a GPT-2 size, ``bert-large``, ``bert-tiny``) the
model is captured at that micro-batch and priced with :func:`rannc_hf.profile.analytic.op_times` on the H200
profile (eager autocast bf16: the ``compile: false`` table), split into GEMMs, fused attention and the rest
(memory-bound ops), plus the most expensive op names. On a CUDA machine the same model then trains eagerly
(bf16 autocast, fused AdamW, as ``single_gpu.py``'s ``plain``) and ``torch.profiler`` sums two steps' kernels into
the same groups (kernel names: cuBLAS/CUTLASS GEMMs, flash/memory-efficient attention, the optimizer, the rest).

    python benchmarks/cost_breakdown.py --variants bert-large:32 1.3b:16    # on a GPU: both sides
    python benchmarks/cost_breakdown.py --variants bert-tiny:4             # CPU: the prediction only

Writes ``$OUT/cost_breakdown.json`` (``OUT`` defaults to ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (SIGUSR1 stack dumps, versions, timing)

_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|_mma_|wgmma", re.I)
_ATTN = re.compile(r"flash|fmha|attention|mem_eff|efficient_attention", re.I)
_OPT = re.compile(r"adam|multi_tensor|foreach", re.I)


def kernel_group(name: str) -> str:
    """The group a CUDA kernel's name puts it in: ``attention``, ``gemm``, ``optimizer`` or ``memory``."""
    if _ATTN.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    if _OPT.search(name):
        return "optimizer"
    return "memory"


def predicted(size: str, mb: int, device: str = "h200") -> dict:
    """The analytic model's forward + backward milliseconds at micro-batch ``mb``, by kind and by op name."""
    import torch

    from rannc_hf.capture import capture
    from rannc_hf.profile.analytic import ATTENTION, GEMM, MEMORY, base_name, op_cost_table, op_times
    from rannc_hf.profile.devices import get_profile
    from single_gpu import build

    with torch.device("meta"):
        model, cfg, seq = build(size, "meta")
    x = torch.randint(0, cfg.vocab_size, (mb, seq), device="meta")
    graph = capture(model, {"input_ids": x, "labels": x})
    table = op_cost_table(graph, "bf16")
    fwd, bwd = op_times(table, get_profile(device), batch=mb)
    total = fwd + bwd
    names = {GEMM: "gemm", ATTENTION: "attention", MEMORY: "memory"}
    by_kind = {v: float(total[table.kind == k].sum() * 1e3) for k, v in names.items()}
    by_op: dict[str, float] = defaultdict(float)
    for op, t in zip(graph.ops, total):
        by_op[base_name(op.target)] += float(t) * 1e3
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"fwd_ms": float(fwd.sum() * 1e3), "bwd_ms": float(bwd.sum() * 1e3), "by_kind_ms": by_kind,
            "top_ops_ms": top, "matmul_tflop": _matmul_flops(table, mb) / 1e12}


def _matmul_flops(table, mb: int) -> float:
    from rannc_hf.profile.analytic import ATTENTION, GEMM

    s = table.scale(mb)
    mm = (table.kind == GEMM) | (table.kind == ATTENTION)
    return float(((table.flops + table.bwd_flops) * s)[mm].sum())


def measured(size: str, mb: int, steps: int, warmup: int, compiled: bool = False) -> dict:
    """Eager bf16 autocast training of the same model: step time, two profiled steps' kernels by group and by
    the aten op that launched them; with ``compiled`` also the step time of ``torch.compile(model)``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from single_gpu import build

    dev = torch.device("cuda")
    model, cfg, seq = build(size, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (mb, seq), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = common.seconds_per_call(step, steps, warmup, cuda=True) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if us <= 0:
            continue
        if e.key.startswith("aten::"):   # the kernels this op launched itself
            ops[e.key] += us / 2e3
            continue
        if e.device_type.name != "CUDA":
            continue
        groups[kernel_group(e.key)] += us / 2e3
        kernels[e.key[:90]] += us / 2e3
    out = {"step_ms": step_ms, "kernel_ms": dict(groups), "kernel_total_ms": sum(groups.values()),
           "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:40]),
           "by_aten_op_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
    if compiled:
        model = torch.compile(model)
        # warmup + 1: the compiling step
        out["compiled_step_ms"] = common.seconds_per_call(step, steps, warmup + 1, cuda=True) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=["bert-large:32", "1.3b:16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compiled", action="store_true", help="also time torch.compile(model) (GPU)")
    args = ap.parse_args()
    import torch

    out = {"environment": common.environment(), "results": {}}
    for v in args.variants:
        size, mb = v.split(":")
        r = {"predicted": predicted(size, int(mb))}
        if torch.cuda.is_available():
            r["measured"] = measured(size, int(mb), args.steps, args.warmup, args.compiled)
            torch.cuda.empty_cache()
        out["results"][v] = r
        p = r["predicted"]
        line = f"{v}: predicted fwd+bwd {p['fwd_ms'] + p['bwd_ms']:.1f} ms " + \
            " ".join(f"{k} {t:.1f}" for k, t in p["by_kind_ms"].items())
        if "measured" in r:
            m = r["measured"]
            line += f" | measured step {m['step_ms']:.1f} ms, kernels " + \
                " ".join(f"{k} {t:.1f}" for k, t in sorted(m["kernel_ms"].items()))
            if "compiled_step_ms" in m:
                line += f", compiled step {m['compiled_step_ms']:.1f} ms"
        print(line, flush=True)
    d = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "cost_breakdown.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
