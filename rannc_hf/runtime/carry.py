"""Carrying one step's new gradients to ``.grad``: the loss ``forward`` returns and what its ``backward`` does.

    # inside RanncModule.forward (pipeline path and fast path alike)
    saved = stash_grads(params)                      # the step's gradients land in fresh buffers
    ...                                              # run the microbatches (forward + backward)
    new = restore_grads(params, saved)
    new = finish_new_grads(rm, new, m)               # / microbatches (and fp16 scale); fp16 overflow check
    loss = _CarryGrads.apply(torch.empty(0, requires_grad=True), loss, rm, _Payload(params, new, rm._sync))
    loss.backward()                                  # -> rm._accumulate(payload, grad_output): .grad += go * new
"""

from __future__ import annotations

import torch

from .grads import any_nonfinite


class _Payload:
    __slots__ = ("params", "grads", "synced")

    def __init__(self, params, grads, synced):
        self.params, self.grads, self.synced = params, grads, synced


class _CarryGrads(torch.autograd.Function):
    """Returns the loss; its backward adds ``grad_output * new_grads`` into ``.grad``."""

    @staticmethod
    def forward(ctx, anchor, loss, owner, payload):
        ctx.owner, ctx.payload = owner, payload
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.owner._accumulate(ctx.payload, grad_output)
        return None, None, None, None


def finish_new_grads(rm, new: list, m: int, mean_in_loss: bool = False) -> list:
    """The new gradients of a step over ``m`` microbatches, divided by ``m`` (unless ``mean_in_loss``: the pipeline
    already scaled each microbatch loss by 1/m) and by the fp16 loss scale; with the fp16 scaler: the inf/nan check
    (all-reduced over every rank), the scaler update, and no gradients (all None) for an overflowing step. ``rm`` is
    the RanncModule. Returns the list to carry (divided in place)."""
    div = (1.0 if mean_in_loss else float(m)) * (rm.scaler.scale if rm.scaler.enabled else 1.0)
    if div != 1.0:
        for g in new:
            if g is not None:
                g.div_(div)
    if rm.scaler.enabled:
        bad = any_nonfinite(new, None, rm.device, force=rm._debug_inject_inf)
        rm._debug_inject_inf = False
        rm.scaler.update(bad)
        if bad:
            new = [None] * len(new)
    return new
