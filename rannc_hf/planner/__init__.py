"""Planner: Graph + costs -> Plan (stages x replicas x microbatches, schedule, recompute, offload).

    >>> import rannc_hf
    >>> from rannc_hf.zoo import make
    >>> p = rannc_hf.plan(*make("bert", batch_size=8), cluster=rannc_hf.Cluster(num_gpus=2, device="h100"),
    ...                   progress=False)
    >>> p.world_size
    2

Modules: :mod:`.coarsen` (ops -> blocks), :mod:`.costs` (block costs per microbatch size),
:mod:`.memory` (per-stage memory), :mod:`.simulate` (schedule simulator), :mod:`.search` (the
search and the even/params baselines), :mod:`.api` (``plan()``), :mod:`.plan` (the Plan data).
"""

from .plan import Plan, StagePlan


def plan(*args, **kwargs):
    """See :func:`rannc_hf.planner.api.plan`."""
    from .api import plan as _plan

    return _plan(*args, **kwargs)


__all__ = ["Plan", "StagePlan", "plan"]
