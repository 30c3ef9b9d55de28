"""A CUDA out-of-memory error during a training step, explained in terms of the plan and what to change.

torch's pipelining wraps the error of a stage's backward in a ``RuntimeError``; :func:`explain_oom` finds the
``torch.OutOfMemoryError`` in the chain and returns a :class:`~rannc_hf.errors.PlanDoesNotFitError` that says
what the plan predicted, what the offload engine added on the GPU, and which settings give memory back::

    try:
        loss_sum = pipe.run(inputs, train=True)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        err = explain_oom(module, e)
        if err is None:
            raise
        raise err from e
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import PlanDoesNotFitError
from ..units import format_bytes


def find_oom(e: BaseException) -> Optional[torch.OutOfMemoryError]:
    """The CUDA out-of-memory error in ``e``'s cause/context chain, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def explain_oom(module, e: BaseException) -> Optional[PlanDoesNotFitError]:
    """A :class:`PlanDoesNotFitError` explaining the out-of-memory error in ``e`` (None if there is none)."""
    oom = find_oom(e)
    if oom is None:
        return None
    cfg, plan = module.config, module.plan
    lines = [f"CUDA ran out of memory during a training step: {str(oom).splitlines()[0]}"]
    if plan is not None and plan.stages and all(s.memory for s in plan.stages):
        peak = max(s.peak_bytes for s in plan.stages)
        cap = cfg.gpu_memory_bytes or (torch.cuda.get_device_properties(module.device).total_memory
                                       if module.device.type == "cuda" else None)
        lines.append(f"The plan predicted a peak of {format_bytes(peak)} per GPU"
                     + (f" under a cap of {format_bytes(cap)} less mem_margin {cfg.mem_margin:g}" if cap else "") + ".")
    fixes = []
    so = getattr(module, "_offload", None)
    eng = so.engine if so is not None else None
    if eng is not None and (eng.device_step_blocks or eng.gpu_step_rest):
        what = f"{eng.device_step_blocks} GPU-stepped block(s)" + (" and the rest group" if eng.gpu_step_rest else "")
        lines.append(f"The offload engine filled the memory the plan left free with {what} (optimizer state "
                     f"kept on the GPU; gpu_step_blocks: {cfg.gpu_step_blocks}).")
        fixes.append(f"gpu_step_blocks: {eng.device_step_blocks // 2} (fewer blocks' optimizer state on the GPU; "
                     f"0 keeps all of it on the host)")
    fixes.append(f"mem_margin: {min(0.5, cfg.mem_margin + 0.15):g} (the plan leaves more of the GPU free; now "
                 f"{cfg.mem_margin:g})")
    fixes.append("recompute: full, or more micro-batches (num_microbatches), or more GPUs")
    if eng is not None and eng.stepped_in_backward():
        lines.append("Some offloaded blocks had already stepped inside this call's backward (step_in_backward): "
                     "restart from the last checkpoint.")
    lines.append("To fit, set one of: " + "; ".join(fixes) + ".")
    return PlanDoesNotFitError("\n".join(lines))
