"""Fences: the two calls that tell an :class:`~rannc_hf.offload.engine.OffloadEngine` where a block starts and ends.

They are plain functions so the pipeline runtime can insert them as ``call_function`` nodes into an
fx stage graph, where parameters are read through ``get_attr`` and module hooks never fire::

    x = offload_enter(engine_id, i, x)        # before the first op of block i (same tensor back)
    ... block i's ops, reading block i's parameters via get_attr ...
    y = offload_exit(engine_id, i, y)         # after its last op

In a graph: ``graph.call_function(offload_enter, (engine.id, i, x))`` and route the users of ``x``
through the new node (with several tensors it returns a tuple: add ``operator.getitem`` nodes).
``engine_id`` is ``engine.id``, an int (graphs stay printable and picklable-free of objects).

Forward: ``offload_enter`` runs ``before_forward(i)`` (block resident, next prefetched),
``offload_exit`` runs ``after_forward(i)`` (released unless kept for backward).
Backward: gradient hooks on the tensors passed in do the rest: the first gradient that reaches
any tensor given to ``offload_exit`` calls ``before_backward(i)`` (fetch ``i``, prefetch ``i-1``);
when the gradients of *all* tensors given to ``offload_enter`` are complete, ``after_backward(i)``
releases the block. Pass every activation that flows into the block to ``offload_enter`` and every
activation that leaves it to ``offload_exit`` (tensors that do not require grad are ignored).
A block whose forward runs again inside backward (activation recompute) is recognised and kept
resident. The tensors are returned unchanged (no view, no copy), so in-place ops on them are fine.
Under ``torch.compile`` the fences are graph breaks (they have side effects by design).
"""

from __future__ import annotations

import torch

from .engine import get_engine

try:
    _disable = torch.compiler.disable
except AttributeError:  # pragma: no cover
    def _disable(fn):
        return fn


def _grad_tensors(tensors):
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


@_disable
def offload_enter(engine_id: int, block: int, *tensors):
    """Start of block ``block``: make it resident; its release is hooked on ``tensors``' gradients."""
    eng = get_engine(engine_id)
    eng.before_forward(block)
    if torch.is_grad_enabled():
        ts = _grad_tensors(tensors)
        if ts:
            remaining = [len(ts)]

            def _hook(_grad, eng_id=engine_id, i=block, remaining=remaining):
                remaining[0] -= 1
                if remaining[0] == 0:
                    get_engine(eng_id).after_backward(i)

            for t in ts:
                t.register_hook(_hook)
    return tensors[0] if len(tensors) == 1 else tensors


@_disable
def offload_exit(engine_id: int, block: int, *tensors):
    """End of block ``block``: release it (or keep it for backward); fetch it back when gradients arrive."""
    eng = get_engine(engine_id)
    eng.after_forward(block)
    if torch.is_grad_enabled():
        for t in _grad_tensors(tensors):
            t.register_hook(lambda _grad, eng_id=engine_id, i=block: get_engine(eng_id).before_backward(i))
    return tensors[0] if len(tensors) == 1 else tensors
