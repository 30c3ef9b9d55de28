"""Building :class:`~rannc_hf.runtime.module.RanncModule`: layout decision, capture, stages, optimizer narrowing.

    model = rannc_hf.RanncModule(MyModel(), optimizer, config=cfg)
    model.build(example_batch)          # = what the first forward does: _decide (plan / planner / config, mesh),
    model.built, model.plan             # capture at microbatch size, this rank's stages, process groups
    model.set_optimizer(opt)            # narrowed in place to this rank's parameters

A batch of a new shape/dtype signature (or eval mode) is captured again and built with the same cuts
(``_Variant`` per signature). :class:`_BuildMixin` holds the RanncModule methods (``_ensure_built``,
``_build_variant``, ``_localize_optimizer``, ``_release_nonlocal``, ``compile_enabled``, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..capture import capture
from ..capture.graph import Graph
from ..config import compiles
from ..errors import ShapeMismatchError
from .mesh import Mesh, init_distributed
from .pipeline import StagePipeline
from .planning import cuts_for, decide_layout
from .stages import stage_specs

log = logging.getLogger(__name__)


@dataclass
class _Variant:
    """Everything built for one (input signature, train/eval) combination."""

    graph: Graph
    cuts: list
    pipe: StagePipeline
    params: list                  # local trainable parameters (unique objects)
    names: list                   # their graph FQNs
    holders: dict                 # graph FQN -> sorted pipeline ranks reading it (params and buffers)
    shared_groups: list = field(default_factory=list)   # [(pp ranks, [param indices], group)]
    # any stage (on any rank) reads a trainable parameter: the same on every rank, so all ranks agree on running
    # the training schedule even where this rank's stages hold no parameters (e.g. a loss-only last stage)
    trains: bool = True


def _reads_trainable(model: nn.Module, names) -> bool:
    """True if any of the get_attr targets ``names`` (of all stages) is a parameter of ``model`` with
    ``requires_grad``. Decided from the whole graph, never from one rank's stages, so every rank agrees."""
    for name in names:
        try:
            if model.get_parameter(name).requires_grad:
                return True
        except AttributeError:
            continue
    return False


def apply_memory_cap(cap_bytes: Optional[int], device: torch.device) -> Optional[float]:
    """Hold the CUDA caching allocator to ``cap_bytes`` (config ``gpu_memory``) so that a plan made for a
    smaller GPU is also run as one: going over it is an out-of-memory error, not a silent overrun.
    Returns the fraction set, or None (no cap, a CPU device, or a cap at least the device's memory)."""
    if not cap_bytes or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_bytes >= total:
        return None
    frac = cap_bytes / total
    torch.cuda.set_per_process_memory_fraction(frac, device)
    log.info("GPU memory capped at %.2f GiB (%.1f%% of %s) per config gpu_memory", cap_bytes / 2**30,
             100 * frac, torch.cuda.get_device_name(device))
    return frac


def _weights_device(module: nn.Module) -> Optional[torch.device]:
    """Where ``module``'s weights are (None: no weights, or on ``meta``, where the batch is used as given)."""
    ref = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if ref is None or ref.device.type == "meta" else ref.device


def _moved(batch: dict, device: Optional[torch.device]) -> dict:
    """``batch`` with its tensors on ``device`` (as given when None)."""
    if device is None:
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _BuildMixin:
    """RanncModule's building methods (mixed into :class:`~rannc_hf.runtime.module.RanncModule`)."""

    def _capture(self, example: dict) -> Graph:
        """Capture the module as the plan was made (a large head split into chunks when the planner chose so)."""
        plan = getattr(getattr(self, "layout", None), "plan", None)
        return capture(self.module, example, split_min_out_features=getattr(plan, "split_min_out_features", None))

    def _ensure_built(self, tensors: dict, other: dict, train: bool) -> Optional[_Variant]:
        if self._fast:
            return None
        sig = self._signature(tensors, other, train)
        var = self._variants.get(sig)
        if var is not None:
            return var
        B = self._batch_of(tensors)
        if self.layout is None:
            self._decide(tensors, other, B)
            if self._fast_eligible():
                self._build_fast(tensors, other, B, train)
                if self._fast:
                    return None
        rows = self._check_batch(B)
        mb = rows // self.layout.num_microbatches
        example = {k: v[:mb] for k, v in tensors.items()}
        example.update(other)
        var = self._build_variant(example, train)
        self._variants[sig] = var
        return var

    def _decide(self, tensors: dict, other: dict, B: int) -> None:
        init_distributed(self.config.collective_timeout_s, self.device)
        apply_memory_cap(self.config.gpu_memory_bytes, self.device)
        world = dist.get_world_size()
        plan = self._given_plan
        pf = self.config.plan_file
        if plan is None and pf and os.path.exists(pf):
            from ..planner.plan import Plan

            plan = Plan.load(pf)
            self._plan_from_file = True
        if plan is not None:
            plan.check_world(world)
        # export (the planner captures too) needs the batch where the weights are, often still the CPU
        batch = _moved({**tensors, **other}, _weights_device(self.module))
        self.layout = decide_layout(self.module, batch, self.config, world_size=world, batch_size=B,
                                    plan=plan, batch_is_local=self.local_batch)
        pp = self.layout.num_stages // self.layout.virtual_stages
        plan = self.layout.plan
        self.mesh = Mesh(pp, self.layout.dp_size, self.config.collective_timeout_s, self.device,
                         dp_inner=bool(plan is not None and plan.dp_inner))

    def _build_variant(self, example: dict, train: bool) -> _Variant:
        was = self.module.training
        self.module.train(train)
        try:
            g = self._given_graph if (self._given_graph is not None and not self._variants and train) else None
            if g is None:
                # export needs the batch where the weights are: on the device for a re-capture (new shape,
                # eval), else where the user left them (often the CPU, with the batch already on the GPU)
                dev = (self.device if self._primary is not None and self._local_on_device()
                       else _weights_device(self.module))
                example = _moved(example, dev)
                with self._stand_ins():
                    g = self._capture(example)
        finally:
            self.module.train(was)
        lay, mesh = self.layout, self.mesh
        if self._primary is None:
            if lay.plan is not None and getattr(self, "_plan_from_file", False):
                lay.plan.check_graph(g)
            cuts = cuts_for(g, lay)
        else:  # a new shape / mode: keep the cuts when they fit, so parameters stay where they are
            prev = self._primary.cuts
            if len(g.ops) == len(self._primary.graph.ops) and all(g.valid_cuts[c] for c in prev):
                cuts = list(prev)
            else:
                from .planning import fallback_cuts

                cuts = fallback_cuts(g, lay.num_stages)
        # "selective" is priced like "full" by the planner and run the same way (segment checkpoints)
        recompute = ["full" if self.config.recompute in ("full", "selective") else "none"] * lay.num_stages
        starts = None  # the plan's checkpoint segments, when its stages are the ones being built
        if lay.plan is not None and len(lay.plan.stages) == lay.num_stages:
            recompute = ["none" if s.recompute == "none" else "full" for s in lay.plan.stages]
            if [s.op_range[0] for s in lay.plan.stages[1:]] == [c + 1 for c in cuts]:
                starts = [list(s.recompute_starts) for s in lay.plan.stages]
        pipe = StagePipeline(g, cuts, mesh, lay.num_microbatches, lay.schedule, virtual_stages=lay.virtual_stages,
                             model=self.module, precision=self.config.precision, recompute=recompute,
                             compile_backend=self._compile_backend(train), recompute_starts=starts)
        holders: dict[str, list[int]] = {}
        for spec in stage_specs(g, cuts):
            for name in spec.params:
                holders.setdefault(name, set()).add(spec.index % mesh.pp_size)
        holders = {k: sorted(v) for k, v in holders.items()}
        names = pipe.param_names
        params = pipe.params
        var = _Variant(g, cuts, pipe, params, names, holders, trains=_reads_trainable(self.module, holders))
        # groups of pipeline ranks that share parameters (created in the same order on every rank)
        sets = sorted({tuple(v) for k, v in holders.items() if len(v) > 1})
        groups = mesh.holder_groups(sets)
        for s, grp in zip(sets, groups):
            idx = sorted((i for i, n in enumerate(names) if tuple(holders[n]) == s), key=lambda i: names[i])
            if grp is not None and idx:
                var.shared_groups.append((s, idx, grp))
        if self._primary is None:
            self._primary = var
            self._on_first_build(g, cuts)
        elif {id(p) for p in params} != {id(p) for p in self._primary.params}:
            raise ShapeMismatchError(
                f"a batch of this shape/mode (training={train}) would place different parameters on pipeline rank "
                f"{mesh.pp_rank} than the first one; pad or bucket inputs to the shapes seen first (e.g. pad "
                f"sequences to a fixed length) so every step uses the same partition")
        if self._offload is not None and var is not self._primary:
            self._offload.fence(var)
        return var

    def _on_first_build(self, g: Graph, cuts: list) -> None:
        from ..planner.plan import Plan

        lay = self.layout
        if lay.plan is not None and getattr(self, "_plan_from_file", False):
            self.plan = lay.plan
        elif lay.plan is not None and _same_cuts(lay.plan, g, cuts):
            # the planner's cuts are the ones running (its op ranges refer to the microbatch-size graph):
            # keep its per-stage memory, fwd/bwd times and predicted step time for plan.summary()
            self.plan = lay.plan
            if not self.plan.graph_fingerprint:
                self.plan.graph_fingerprint = g.fingerprint()
        else:
            self.plan = Plan.from_cuts(g, cuts, num_microbatches=lay.num_microbatches, dp_size=lay.dp_size,
                                       schedule=lay.schedule, virtual_stages=lay.virtual_stages)
            if lay.plan is not None:
                self.plan.notes = list(getattr(lay.plan, "notes", [])) + [
                    "the planner's cuts did not fit the captured microbatch graph: balanced cuts are used and "
                    "stage costs are not predicted"]
                self.plan.partitioner = lay.plan.partitioner
        pf = self.config.plan_file
        if pf and not os.path.exists(pf) and dist.get_rank() == 0:
            self.plan.save(pf)
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            self._full_meta[id(t)] = (tuple(t.shape), t.dtype)
        self._localize_optimizer()
        self._attach_offload()
        if self.device.type == "cuda":
            self._release_nonlocal()
        self._prefer_fused_optimizer()

    def _localize_optimizer(self) -> None:
        opt = self.optimizer
        if opt is None:
            return
        local = {id(p) for p in self.local_parameters()}
        self._opt_groups_fqn = []
        for group in opt.param_groups:
            self._opt_groups_fqn.append([self._name_of.get(id(p), "") for p in group["params"]])
            group["params"] = [p for p in group["params"] if id(p) in local]
        for p in list(opt.state):
            if id(p) not in local:
                del opt.state[p]
        if self.config.precision == "fp16":
            orig = opt.step
            scaler = self.scaler

            def step(*args, **kwargs):
                if scaler.consume_skip():
                    return None
                return orig(*args, **kwargs)

            opt.step = step

    def _prefer_fused_optimizer(self) -> None:
        """On CUDA, without offload on this rank and outside fp16 (its scaler), an Adam/AdamW whose
        implementation the user left to torch steps with the fused kernel (:mod:`.fused_optimizer`)."""
        from .fused_optimizer import prefer_fused

        if (self.optimizer is None or self.device.type != "cuda" or self._offload is not None
                or self.config.precision == "fp16"):
            return
        if prefer_fused(self.optimizer, "cuda"):
            log.info("optimizer: %s steps with torch's fused kernel (pass foreach= or fused= to choose)",
                     type(self.optimizer).__name__)

    @property
    def compile_enabled(self) -> bool:
        """``config.compile`` as :func:`~rannc_hf.config.compiles` reads it (``auto``: on CUDA with bf16/fp16
        compute)."""
        return self._compiles()

    def _compiles(self) -> bool:
        return compiles(self.config.compile, self.config.precision, self.device.type == "cuda")

    def _compile_backend(self, train: bool = True) -> Optional[str]:
        """The ``torch.compile`` backend, or None when compile is off (``RANNC_HF_COMPILE_BACKEND`` overrides
        ``inductor``, e.g. ``aot_eager`` for fast CPU tests). ``auto`` leaves evaluation graphs eager: an evaluation
        runs a few batches, and compiling GPT-2 1.3B's offloaded eval graph cost more than a minute on the H200
        (``true`` compiles them too)."""
        if not self._compiles():
            return None
        if not train and str(self.config.compile).lower() == "auto":
            return None
        return os.environ.get("RANNC_HF_COMPILE_BACKEND") or "inductor"

    def _maybe_compile(self, module: nn.Module) -> nn.Module:
        """``module`` or its ``torch.compile`` wrapper per ``config.compile`` (see :attr:`compile_enabled`)."""
        backend = self._compile_backend()
        return module if backend is None else torch.compile(module, backend=backend)

    def _attach_offload(self) -> None:
        """Per-stage offload (see :mod:`rannc_hf.runtime.offload_stage`): engine, fences, optimizer routing."""
        from .offload_stage import attach

        self._offload = attach(self)

    def _local_tensor_ids(self) -> set[int]:
        ids = set()
        for m in self._primary.pipe.modules:
            for t in list(m.parameters()) + list(m.buffers()):
                ids.add(id(t))
        return ids

    def _local_on_device(self) -> bool:
        for m in self._primary.pipe.modules:
            for t in m.parameters():
                return t.device == self.device
        return False

    @contextlib.contextmanager
    def _stand_ins(self) -> Iterator[None]:
        """During a capture, tensors emptied by :meth:`_release_nonlocal` get a stand-in of their full shape and
        dtype (parameters: one zero expanded to the shape, no memory; buffers, which the graph may write in
        place: real zeros); the same objects get their empty storage back afterwards, so stage modules bind
        the real parameter objects."""
        swapped = []
        try:
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                meta = self._full_meta.get(id(t))
                if meta is None or t.numel() > 0 or tuple(t.shape) == tuple(meta[0]):
                    continue
                shape, dtype = meta
                dev = self.device if self._local_on_device() else t.device
                if isinstance(t, nn.Parameter):
                    stand = torch.zeros((), dtype=dtype, device=dev).expand(shape)
                else:
                    stand = torch.zeros(shape, dtype=dtype, device=dev)
                swapped.append((t, t.data))
                t.data = stand
            yield
        finally:
            for t, old in swapped:
                t.data = old

    def _release_nonlocal(self) -> None:
        """GPU runs: parameters/buffers no local stage reads keep no memory (their shapes are remembered)."""
        local = self._local_tensor_ids()
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if id(t) not in local and t.numel() > 0:
                t.data = torch.empty(0, dtype=t.dtype, device="cpu")



def _same_cuts(plan, g: Graph, cuts: list) -> bool:
    """True if ``plan``'s stages end at ``cuts`` of ``g`` (same op count, same cut positions)."""
    return int(plan.num_ops or len(g.ops)) == len(g.ops) and list(plan.cuts) == [int(c) for c in cuts]
