"""Shared pieces of the multi-process tests: start workers under torchrun (gloo, CPU), read a case's result,
and the single-process reference they are compared with (gradient accumulation over contiguous chunks).

    torchrun(WORKER, out_dir, "ws2", 2)            # the worker writes <case>.json (or <case>_r<rank>.json)
    info = read_case(out_dir, "pp2_dp1_1f1b")
    losses, norms = accumulated_reference(model, batches, steps=3, batch=8, chunks=4, lr=1e-3)

and, inside a worker, ``run_steps`` (the same training through a RanncModule) and ``record_case``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import torch

from rannc_hf.zoo import loss_of

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(worker: str, out: str, suite: str, nproc: int, timeout: float = 420) -> None:
    """Run ``worker out suite`` on ``nproc`` processes; a failure or a hang fails the test with the workers' output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           worker, out, suite]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"workers ({suite}) hung: {str(e.stderr)[-3000:] if e.stderr else ''}") from None
    if p.returncode != 0:
        raise AssertionError(f"workers ({suite}) failed with {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")


def read_case(out: str, name: str) -> dict:
    """The result a worker wrote for case ``name``; if it failed, the ranks' errors and tracebacks."""
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        errs = [f for f in os.listdir(out) if f.startswith(name + "_r") and f.endswith(".json")]
        msgs = [json.load(open(os.path.join(out, f))) for f in errs]
        raise AssertionError(f"case {name} failed: " + "\n".join(f"{m['error']}\n{m['trace']}" for m in msgs))
    info = json.load(open(path))
    assert info["ok"] and info["all_ranks_ok"], info
    return info


def accumulated_reference(model, batches, steps: int, batch: int, chunks: int, lr: float, clip: float | None = 1.0):
    """Train ``model`` in one process: AdamW(lr), per step the batch split into ``chunks`` contiguous chunks,
    loss = mean of chunk losses, clip_grad_norm_(clip) (None: no clipping, the norm still reported).
    Returns (losses, gradient norms); ``model`` is trained."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, norms = [], []
    for step in range(steps):
        b = batches(batch, step)
        total = 0.0
        for c in range(chunks):
            loss = loss_of(model(**{k: v.chunk(chunks)[c] for k, v in b.items()})) / chunks
            loss.backward()
            total += float(loss.detach())
        if clip is None:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms


def run_steps(rm, opt, batches, steps: int, batch: int = 8) -> tuple[list[float], list[float]]:
    """``steps`` training steps of ``rm`` on ``batches(batch, step)`` with clipping at 1.0: (losses, grad norms)."""
    losses, norms = [], []
    for step in range(steps):
        loss = loss_of(rm(**batches(batch, step)))
        loss.backward()
        norms.append(float(rm.clip_grad_norm_(1.0)))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, norms


def record_case(out: str, name: str, fn) -> None:
    """Worker side of :func:`read_case`: run ``fn()`` (a dict of results) on every rank; rank 0 writes
    ``<name>.json`` with ``all_ranks_ok``, a failing rank ``<name>_r<rank>.json`` with its error and traceback."""
    import torch.distributed as dist

    try:
        info = fn() or {}
        info.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - recorded for the test to report
        info = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    # every rank reports whether it succeeded (a failure on one rank must not pass silently)
    flag = torch.tensor([1.0 if info.get("ok") else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    info["all_ranks_ok"] = bool(flag.item() > 0)
    rank = dist.get_rank()
    if rank == 0 or not info.get("ok"):
        with open(os.path.join(out, (name if info.get("ok") else f"{name}_r{rank}") + ".json"), "w") as f:
            json.dump(info, f)
