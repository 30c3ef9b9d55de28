"""rannc_hf: automatic pipeline + data-parallel partitioning and offload for any PyTorch model.

    import rannc_hf
    plan = rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(num_gpus=8, gpu_memory="80GiB"))
    print(plan.summary())
    model = rannc_hf.RanncModule(model, optimizer, config=rannc_hf.RanncConfig(num_stages=2))

Names are imported lazily so that ``import rannc_hf`` stays fast and light.
"""

from __future__ import annotations

import importlib

from .config import Cluster, RanncConfig
from .errors import (CaptureError, CheckpointError, ConfigError, OffloadError, PlanDoesNotFitError,
                     PlanMismatchError, RanncError, ShapeMismatchError)

__version__ = "0.1.0"

_LAZY = {
    "capture": ("rannc_hf.capture", "capture"),
    "Graph": ("rannc_hf.capture", "Graph"),
    "plan": ("rannc_hf.planner", "plan"),
    "Plan": ("rannc_hf.planner", "Plan"),
    "RanncModule": ("rannc_hf.runtime", "RanncModule"),
    "RanncPlugin": ("rannc_hf.integrations.accelerate", "RanncPlugin"),
    "RanncAccelerator": ("rannc_hf.integrations.accelerate", "RanncAccelerator"),
    "RanncTrainer": ("rannc_hf.integrations.trainer", "RanncTrainer"),
    "RanncTrainingArguments": ("rannc_hf.integrations.trainer", "RanncTrainingArguments"),
    "RanncStatsCallback": ("rannc_hf.integrations.trainer", "RanncStatsCallback"),
}

__all__ = ["Cluster", "RanncConfig", "RanncError", "ConfigError", "CaptureError", "PlanDoesNotFitError",
           "PlanMismatchError", "ShapeMismatchError", "CheckpointError", "OffloadError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rannc_hf' has no attribute {name!r}")
