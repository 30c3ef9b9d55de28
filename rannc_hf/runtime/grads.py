"""Gradient plumbing across ranks: fresh-buffer capture, dp averaging, tied-weight sums, global norm.

    saved = stash_grads(params)                 # .grad -> None, old values kept aside
    pipe.run(inputs)                            # the schedule writes fresh gradients
    new = restore_grads(params, saved)          # [fresh grad or None], .grad back to the old values
    allreduce_mean_(new, mesh.dp_group, mesh.dp_size)
    total = global_grad_norm(owned_grads, mesh.pp_group)

All collectives flatten tensors per dtype into one buffer (one call per dtype, not per parameter).
A parameter whose gradient is None on every rank of the group stays None (AdamW then skips it, as
it would on one GPU); if any rank has a gradient, the others contribute zeros.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def stash_grads(params: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    return saved


def restore_grads(params: Sequence[torch.Tensor], saved: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    new = [p.grad for p in params]
    for p, g in zip(params, saved):
        p.grad = g
    return new


def allreduce_sum_(params: Sequence[torch.Tensor], grads: list[Optional[torch.Tensor]],
                   group: Optional[dist.ProcessGroup], divide_by: float = 1.0) -> None:
    """In place: ``grads[i] = sum over group of grads[i] / divide_by`` (None where None on every rank)."""
    if group is None or dist.get_world_size(group) == 1:
        if divide_by != 1.0:
            for g in grads:
                if g is not None:
                    g.div_(divide_by)
        return
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([0.0 if g is None else 1.0 for g in grads], device=dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    idx = [i for i, h in enumerate(has.tolist()) if h > 0]
    for i in idx:
        if grads[i] is None:
            grads[i] = torch.zeros_like(params[i])
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in idx:
        by_dtype.setdefault(grads[i].dtype, []).append(i)
    for _, ids in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
        flat = _flatten_dense_tensors([grads[i] for i in ids])
        dist.all_reduce(flat, group=group)
        if divide_by != 1.0:
            flat.div_(divide_by)
        for i, t in zip(ids, _unflatten_dense_tensors(flat, [grads[i] for i in ids])):
            grads[i].copy_(t)


def grad_norm_sq(grads: Sequence[Optional[torch.Tensor]], norm_type: float) -> torch.Tensor:
    """This rank's contribution: sum of |g|^p (or max |g| for inf) over the given gradients, fp32."""
    gs = [g for g in grads if g is not None]
    if not gs:
        return torch.zeros((), dtype=torch.float32)
    if math.isinf(norm_type):
        return torch.stack([g.detach().abs().max().float() for g in gs]).max()
    return torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) for g in gs]).pow(norm_type).sum()


def global_grad_norm(owned_grads: Sequence[Optional[torch.Tensor]], group: Optional[dist.ProcessGroup],
                     norm_type: float = 2.0, device: Optional[torch.device] = None,
                     extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The norm over gradients spread across ``group`` (each gradient listed on exactly one rank);
    ``extra``: this rank's share computed elsewhere (as :func:`grad_norm_sq` returns it, e.g. offloaded ones)."""
    local = grad_norm_sq(owned_grads, norm_type)
    if device is not None:
        local = local.to(device)
    if extra is not None:
        extra = extra.to(local.device, local.dtype)
        local = torch.maximum(local, extra) if math.isinf(norm_type) else local + extra
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
    return local if math.isinf(norm_type) else local.pow(1.0 / norm_type)


def any_nonfinite(grads: Sequence[Optional[torch.Tensor]], group: Optional[dist.ProcessGroup] = None,
                  device: Optional[torch.device] = None, force: bool = False) -> bool:
    """True on every rank of ``group`` if any rank has an inf/nan gradient (one MAX all-reduce)."""
    bad = bool(force) or any(g is not None and not torch.isfinite(g).all() for g in grads)
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if group is not None or dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)
