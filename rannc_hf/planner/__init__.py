"""Planner: Graph + costs -> Plan (stages x replicas x microbatches, schedule, recompute, offload)."""

from .plan import Plan, StagePlan

__all__ = ["Plan", "StagePlan"]
