"""Costs: device profiles, analytic per-op costs, measured block costs, calibration.

    >>> from rannc_hf.profile import get_profile, op_cost_table, op_times
    >>> get_profile("h200").flops["bf16"]
    790000000000000.0

:mod:`.devices` (profiles: h100, h200, a100, cpu, JSON files), :mod:`.analytic` (FLOPs / bytes /
saved activations per op), :mod:`.measure` (timing blocks on this machine, cached on disk),
:mod:`.calibrate` (measure a profile: ``rannc-hf calibrate``).
"""

from .analytic import OpCostTable, op_cost_table, op_times, saved_bytes
from .devices import DeviceProfile, get_profile, list_profiles

__all__ = ["DeviceProfile", "get_profile", "list_profiles", "OpCostTable", "op_cost_table", "op_times", "saved_bytes"]
