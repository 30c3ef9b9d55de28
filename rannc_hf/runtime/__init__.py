"""Runtime: a Plan running on torch.distributed (stage modules, (dp, pp) mesh, pipeline schedules).

    import rannc_hf
    model = rannc_hf.RanncModule(model, optimizer, config=rannc_hf.RanncConfig(num_stages=2))
    loss = model(**batch).loss; loss.backward(); model.clip_grad_norm_(1.0); optimizer.step()

Modules: ``stages`` (build per-stage fx modules), ``mesh`` (process groups), ``pipeline``
(PipelineStage + schedules, gradient sync), ``module`` (the drop-in :class:`RanncModule`).
"""

from __future__ import annotations

import importlib

_LAZY = {"RanncModule": "rannc_hf.runtime.module", "build_stages": "rannc_hf.runtime.stages",
         "Mesh": "rannc_hf.runtime.mesh"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rannc_hf.runtime' has no attribute {name!r}")
