"""Exception types raised by rannc_hf.

Every error says what was wrong and how to fix it. Catch :class:`RanncError` to
handle all of them::

    try:
        plan = rannc_hf.plan(model, batch, cluster=cluster)
    except rannc_hf.errors.PlanDoesNotFitError as e:
        print(e)  # names the smallest memory / GPU count that would fit
"""


class RanncError(Exception):
    """Base class of every error rannc_hf raises on purpose."""


class ConfigError(RanncError, ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, bad value)."""


class CaptureError(RanncError):
    """The model could not be captured as a graph (untraceable op, data-dependent control flow)."""


class PlanDoesNotFitError(RanncError):
    """No partitioning of the model fits the memory available per GPU."""


class PlanMismatchError(RanncError):
    """A saved plan does not match the model, the batch or the world it is used with."""


class ShapeMismatchError(RanncError):
    """A batch has a shape or dtype other than the one the model was planned for."""


class CheckpointError(RanncError):
    """A checkpoint is missing, corrupted, or belongs to a different model."""


class OffloadError(RanncError):
    """An offload plan cannot run (unsupported optimizer, host memory too small)."""
