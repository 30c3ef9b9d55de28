"""The Plan: how a captured model is split into pipeline stages, replicated and scheduled.

    >>> plan = Plan.load("plan.json")              # doctest: +SKIP
    >>> print(plan.summary())                      # doctest: +SKIP
    >>> [s.op_range for s in plan.stages]          # doctest: +SKIP
    [(0, 120), (121, 217)]

A Plan is plain data (JSON, never pickle). Stage ``s`` runs ops ``op_range[0]..op_range[1]``
(inclusive) of the captured :class:`~rannc_hf.capture.Graph`. Every stage has ``dp_size`` replicas;
the world is ``num_stages * dp_size`` ranks, laid out as a ``(dp, pp)`` device mesh.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import PlanMismatchError
from ..units import format_bytes

PLAN_FORMAT = 1


@dataclass
class StagePlan:
    """One pipeline stage: its ops, parameters, predicted memory and time."""

    index: int
    op_range: tuple[int, int]                 # inclusive [first op, last op]
    modules: str = ""                         # human description, e.g. "transformer.h.0 .. transformer.h.5"
    num_params: int = 0
    param_bytes: int = 0
    memory: dict[str, int] = field(default_factory=dict)  # params, grads, optimizer, activations, buffers, total
    fwd_ms: float = 0.0                       # per microbatch
    bwd_ms: float = 0.0                       # per microbatch (recompute included)
    recompute: str = "none"                   # none | full | selective
    recompute_starts: list[int] = field(default_factory=list)  # ops that begin a checkpointed segment
    offload: str = "none"                     # none | optimizer | params | all
    replicas: int = 1
    gpu_step_rest: bool = False               # offload: the engine steps the rest group (embeddings, heads) on the GPU

    @property
    def peak_bytes(self) -> int:
        return int(self.memory.get("total", 0))


@dataclass
class Plan:
    """A complete partitioning decision plus its predicted cost."""

    stages: list[StagePlan]
    num_microbatches: int
    batch_size: int                           # global batch (all replicas), as in the example batch x dp
    dp_size: int = 1
    schedule: str = "gpipe"                   # gpipe | 1f1b | interleaved-1f1b
    virtual_stages: int = 1                   # stages per rank (interleaved schedules)
    partitioner: str = "auto"
    predicted_step_time: float = 0.0          # seconds per optimizer step
    predicted_bubble: float = 0.0             # idle fraction of the pipeline
    gpu_memory: int = 0                       # per-GPU bytes the plan was made for
    device: str = ""                          # device profile name used for costs
    model_class: str = ""
    graph_fingerprint: str = ""
    num_ops: int = 0
    tokens_per_sample: int = 0
    flops_per_step: float = 0.0
    planning_time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    format: int = PLAN_FORMAT
    # added by the automatic planner (defaults keep older plan files loadable)
    baselines: dict[str, float] = field(default_factory=dict)   # partitioner -> predicted step time (s)
    stage_p2p_ms: list[float] = field(default_factory=list)     # send time of each stage's output boundary
    rank_tail_ms: list[float] = field(default_factory=list)     # per rank: all-reduces + optimizer after the pipeline
    cost_source: str = ""                                       # analytic | measured
    split_min_out_features: Optional[int] = None  # capture with this (rannc_hf.capture split_head), as planned
    dp_inner: bool = False    # rank layout: a stage's replicas on neighbouring ranks (rannc_hf.runtime.mesh)
    bidirectional_attention: bool = False   # the graph's attention is not causal (an encoder: compiled, it runs the captured graph)

    # ---- derived -----------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_ranks_pp(self) -> int:
        return len(self.stages) // max(1, self.virtual_stages)

    @property
    def world_size(self) -> int:
        return self.num_ranks_pp * self.dp_size

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // (self.dp_size * self.num_microbatches)

    @property
    def cuts(self) -> list[int]:
        """Index of the last op of every stage but the last."""
        return [s.op_range[1] for s in self.stages[:-1]]

    @classmethod
    def from_cuts(cls, graph, cuts: list[int], num_microbatches: int = 1, dp_size: int = 1,
                  schedule: str = "gpipe", **kw) -> "Plan":
        """A plan with stages ending at the given op indices (no cost prediction); for tests and hand splits."""
        bounds = [-1, *sorted(cuts), len(graph.ops) - 1]
        stages = []
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i] + 1, bounds[i + 1]
            names = {p for op in graph.ops[lo:hi + 1] for p in op.params}
            params = [graph.params[n] for n in names if not graph.params[n].is_buffer]
            stages.append(StagePlan(index=i, op_range=(lo, hi), num_params=sum(p.numel for p in params),
                                    param_bytes=sum(p.nbytes for p in params), replicas=dp_size))
        return cls(stages=stages, num_microbatches=num_microbatches,
                   batch_size=graph.batch_size * dp_size * num_microbatches, dp_size=dp_size, schedule=schedule,
                   partitioner="manual", model_class=graph.model_class, graph_fingerprint=graph.fingerprint(),
                   num_ops=len(graph.ops), **{"bidirectional_attention": graph.has_bidirectional_attention(), **kw})

    # ---- checks ------------------------------------------------------------------------
    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise PlanMismatchError(
                f"this plan needs {self.world_size} processes ({self.num_ranks_pp} pipeline stages x "
                f"{self.dp_size} replicas) but {world_size} were launched. Launch with "
                f"--nproc_per_node/--num_processes {self.world_size}, or delete the plan file to re-plan "
                f"for {world_size} processes."
            )

    def check_graph(self, graph) -> None:
        if self.graph_fingerprint and graph.fingerprint() != self.graph_fingerprint:
            raise PlanMismatchError(
                f"this plan was made for another model or batch shape ({self.model_class}, {self.num_ops} ops, "
                f"fingerprint {self.graph_fingerprint}); the current one is {graph.model_class} with "
                f"{len(graph.ops)} ops (fingerprint {graph.fingerprint()}). Delete the plan file or point "
                f"plan_file elsewhere to re-plan."
            )

    # ---- I/O ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["world_size"] = self.world_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        d = dict(d)
        d.pop("world_size", None)
        if d.get("format", PLAN_FORMAT) > PLAN_FORMAT:
            raise PlanMismatchError(f"plan format {d['format']} is newer than this rannc_hf understands "
                                    f"({PLAN_FORMAT}); upgrade rannc_hf or re-plan")
        stages = [StagePlan(**{**s, "op_range": tuple(s["op_range"])}) for s in d.pop("stages")]
        known = set(cls.__dataclass_fields__)
        return cls(stages=stages, **{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON, atomically (temporary file + rename)."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".plan-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = os.fspath(path)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise PlanMismatchError(f"plan file {path!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanMismatchError(f"plan file {path!r} is not valid JSON ({e}); delete it to re-plan") from None
        try:
            return cls.from_dict(data)
        except (TypeError, KeyError) as e:
            raise PlanMismatchError(f"plan file {path!r} is not a rannc_hf plan ({e}); delete it to re-plan") from None

    # ---- display -----------------------------------------------------------------------
    def summary(self) -> str:
        """A table a person reads: one row per stage."""
        head = (f"Plan for {self.model_class}: {self.num_ranks_pp} stage(s) x {self.dp_size} replica(s) = "
                f"{self.world_size} GPU(s), {self.num_microbatches} microbatch(es) of {self.microbatch_size}, "
                f"schedule {self.schedule}, partitioner {self.partitioner}"
                + (", replicas on neighbouring ranks" if self.dp_inner else ""))
        cols = ["stage", "ops", "modules", "params", "memory", "fwd ms", "bwd ms", "replicas", "recompute", "offload"]
        rows = []
        for s in self.stages:
            rows.append([str(s.index), f"{s.op_range[0]}-{s.op_range[1]}", _clip(s.modules, 40),
                         f"{s.num_params / 1e6:,.1f}M", format_bytes(s.peak_bytes), f"{s.fwd_ms:.2f}",
                         f"{s.bwd_ms:.2f}", str(s.replicas), s.recompute,
                         s.offload + _offload_notes(s)])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        out = [head, line, "-" * len(line)]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        tail = f"predicted step time {self.predicted_step_time * 1e3:.1f} ms, bubble {self.predicted_bubble:.0%}"
        if self.gpu_memory:
            tail += f", GPU memory cap {format_bytes(self.gpu_memory)}"
        if self.device:
            tail += f", cost profile {self.device}"
        out.append(tail)
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, path: str | os.PathLike) -> str:
        """Write a PNG with per-stage memory bars and the simulated pipeline timeline; returns the path."""
        from .plot import plot_plan

        return plot_plan(self, path)


def _offload_notes(s: "StagePlan") -> str:
    """What the offload column adds to the mode: where the rest group steps, where micro-batch gradients are summed."""
    notes = (["rest on GPU"] if s.gpu_step_rest else []) + (["grads summed on GPU"] if s.memory.get("grad_sum") else [])
    return f" ({', '.join(notes)})" if notes else ""


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
