"""This rank's pipeline: ``PipelineStage``s over our stage modules and a ``torch.distributed.pipelining`` schedule.

    # every rank of a replica, after Mesh(pp_size=2)
    pipe = StagePipeline(graph, cuts, mesh, num_microbatches=4, schedule="1f1b")
    loss_sum = pipe.run(inputs if pipe.has_first else None, train=True)
    # loss_sum: sum of the 4 microbatch losses on the rank holding the last stage, else None;
    # .grad of pipe.params holds the SUM over microbatches (divide by 4 for the mean-loss gradient)

Facts this relies on (DESIGN.md 6b): stages get **static** ``input_args``/``output_args`` (meta
tensors shaped from the capture at microbatch size, floats ``requires_grad=True``), so no shape
inference runs (it would feed later stages garbage and update BatchNorm statistics twice). The
loss is computed inside the last stage; the schedule gets ``loss_fn=lambda out, tgt: out * scale``
and a dummy target. ``scale_grads`` is off: the caller divides by the microbatch count once per
parameter (a parameter shared by two stages of one rank would otherwise be divided twice).

Schedules: ``gpipe`` (``ScheduleGPipe``), ``1f1b`` (``Schedule1F1B``, needs microbatches >= pipeline
ranks) and ``interleaved-1f1b`` (``ScheduleInterleaved1F1B``; stage ``pp_rank + k * pp_size`` for
``k < virtual_stages`` live on each rank).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..capture.graph import Graph
from ..errors import ConfigError
from .mesh import Mesh
from .stages import StageModule, build_stages, meta_args

_SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class StagePipeline:
    """The stages this rank runs for one captured graph, their ``PipelineStage``s and the schedule."""

    def __init__(self, graph: Graph, cuts: Sequence[int], mesh: Mesh, num_microbatches: int,
                 schedule: str = "gpipe", *, virtual_stages: int = 1, model: Optional[nn.Module] = None,
                 precision: str = "fp32", recompute: Sequence[str] | str = "none",
                 compile_backend: Optional[str] = None, recompute_starts: Optional[Sequence[Sequence[int]]] = None):
        num_stages = len(cuts) + 1
        if num_stages != mesh.pp_size * virtual_stages:
            raise ConfigError(f"{num_stages} stages do not fit {mesh.pp_size} pipeline ranks x {virtual_stages} "
                              f"virtual stages")
        if schedule == "1f1b" and num_microbatches < mesh.pp_size:
            raise ConfigError(f"schedule 1f1b needs at least as many microbatches as pipeline stages "
                              f"({num_microbatches} < {mesh.pp_size}); raise num_microbatches or use gpipe")
        if virtual_stages > 1 and schedule != "interleaved-1f1b":
            raise ConfigError(f"{virtual_stages} stages per rank need schedule interleaved-1f1b, not {schedule}")
        if schedule == "interleaved-1f1b" and num_microbatches % mesh.pp_size:
            raise ConfigError(f"interleaved-1f1b needs num_microbatches ({num_microbatches}) to be a multiple of "
                              f"the pipeline ranks ({mesh.pp_size})")
        self.graph, self.mesh, self.num_stages = graph, mesh, num_stages
        self.num_microbatches = num_microbatches
        self.schedule_name = schedule
        self.device = mesh.device
        self.stage_ids = [mesh.pp_rank + k * mesh.pp_size for k in range(virtual_stages)]
        self.modules: list[StageModule] = build_stages(graph, cuts, only=self.stage_ids, model=model,
                                                       precision=precision, recompute=recompute,
                                                       device_type=self.device.type, device=self.device,
                                                       recompute_starts=recompute_starts)
        if compile_backend:
            for m in self.modules:
                m.compile(compile_backend)
        self._build_args = (graph, list(cuts), model, precision, compile_backend)
        self._fwd: Optional[list[StageModule]] = None
        self.loss_scale = 1.0
        self.stages = []
        for sid, mod in zip(self.stage_ids, self.modules):
            spec = mod.spec
            ins = meta_args(graph, spec.inputs, transport=not spec.is_first)
            outs = (torch.empty((), dtype=torch.float32, device="meta", requires_grad=True),) if spec.is_last \
                else meta_args(graph, spec.outputs)
            self.stages.append(PipelineStage(mod, sid, num_stages, self.device, input_args=ins, output_args=outs,
                                             group=mesh.pp_group))
        if virtual_stages == 1:
            if schedule not in _SINGLE:
                raise ConfigError(f"unknown schedule {schedule!r} for one stage per rank; use gpipe or 1f1b")
            self.schedule = _SINGLE[schedule](self.stages[0], num_microbatches, loss_fn=self._loss,
                                              scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, num_microbatches, loss_fn=self._loss,
                                                    scale_grads=False)

    # ---- what this rank holds ------------------------------------------------------------
    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def param_names(self) -> list[str]:
        """FQN targets of the trainable parameters the local stages read (one per object)."""
        seen, out = set(), []
        for m in self.modules:
            for name in m.spec.params:
                obj = m.gm.get_parameter(name) if _is_param(m.gm, name) else None
                if obj is not None and obj.requires_grad and id(obj) not in seen:
                    seen.add(id(obj))
                    out.append(name)
        return out

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters of :attr:`param_names`, in the same order."""
        out = []
        for name in self.param_names:
            for m in self.modules:
                if _is_param(m.gm, name):
                    out.append(m.gm.get_parameter(name))
                    break
        return out

    # ---- running -------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out * self.loss_scale if self.loss_scale != 1.0 else out

    def run(self, inputs: Optional[Sequence[torch.Tensor]], train: bool = True) -> Optional[torch.Tensor]:
        """One pass over all microbatches (forward+backward if ``train``): the sum of the microbatch
        losses (unscaled, detached, fp32) on the rank with the last stage, else None."""
        args = tuple(inputs) if self.has_first and inputs is not None else ()
        target = torch.zeros(self.num_microbatches, device=self.device) if self.has_last else None
        losses: list = []
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
        if not self.has_last:
            return None
        total = torch.stack([l.detach().float() for l in losses]).sum()
        return total / self.loss_scale if self.loss_scale != 1.0 else total


    # ---- forward only (eval, logits) --------------------------------------------------------
    def forward_only(self, inputs: Optional[Sequence[torch.Tensor]]) -> tuple[Optional[torch.Tensor], Optional[list]]:
        """Forward of every microbatch through the stages built by ``output_specs`` (no schedule, no autograd):
        boundary values go point to point (``dist.send``/``dist.recv``, shapes and dtypes from the capture) in
        one fixed order on every rank. Returns ``(sum of microbatch losses, [extras of each microbatch])`` on the
        rank holding the last stage, ``(None, None)`` elsewhere."""
        graph, cuts, model, precision, backend = self._build_args
        if self._fwd is None:
            self._fwd = build_stages(graph, cuts, only=self.stage_ids, model=model, precision=precision,
                                     device_type=self.device.type, device=self.device, with_outputs=True)
            if backend:
                for m in self._fwd:
                    m.compile(backend)
        mods = dict(zip(self.stage_ids, self._fwd))
        M, pp, me = self.num_microbatches, self.mesh.pp_size, self.mesh.pp_rank
        ranks = self.mesh.pp_ranks
        chunks = [t.chunk(M) for t in inputs] if self.has_first and inputs is not None else []
        total, extras = None, []
        with torch.no_grad():
            for i in range(M):
                carry = None
                for s in range(self.num_stages):
                    if s not in mods:
                        continue
                    m = mods[s]
                    if s == 0:
                        args = tuple(c[i] for c in chunks)
                    elif (s - 1) % pp == me:
                        args = carry
                    else:
                        args = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device)
                                     for t in meta_args(graph, m.spec.inputs))
                        for t in args:
                            dist.recv(t, src=ranks[(s - 1) % pp])
                    out = m(*args)
                    if m.spec.is_last:
                        loss = out[0] if isinstance(out, (tuple, list)) else out
                        total = loss.detach().float() if total is None else total + loss.detach().float()
                        extras.append(list(out[1:]) if isinstance(out, (tuple, list)) else [])
                    else:
                        carry = tuple(out)
                        if (s + 1) % pp != me:
                            for t in carry:
                                dist.send(t.contiguous(), dst=ranks[(s + 1) % pp])
        if not self.has_last:
            return None, None
        return total, extras


def _is_param(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False
