"""``RanncModule``: the drop-in wrapper that trains any model as a (dp x pp) pipeline.

    # torchrun --nproc_per_node 4 train.py   (the single-GPU loop, plus one line)
    import rannc_hf
    model = MyModel()                                         # or any HF model, with labels in the batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model = rannc_hf.RanncModule(model, optimizer, config=rannc_hf.RanncConfig(num_stages=2, precision="fp32"))
    for batch in loader:                                      # the same global batch on every rank
        loss = model(**batch).loss                            # (plain modules: model(...) returns the loss)
        loss.backward()
        model.clip_grad_norm_(1.0)
        optimizer.step(); optimizer.zero_grad()

Semantics
---------
* **Global batch.** The batch given to ``forward`` is the global batch, the same on every rank (as in
  a single-GPU loop). Replica ``d`` of ``dp_size`` takes the contiguous slice ``d`` of it and splits
  that into ``num_microbatches`` equal chunks. With ``local_batch=True`` (Accelerate-style dataloaders
  that already shard by ``dp_rank``) the batch is this replica's shard. Only the first stage feeds
  inputs in; labels travel through the stages to the loss in the last stage.
* **First call** (or construction with ``example_batch``): decide the layout (``plan=``, then
  ``config.plan_file`` if it exists -> checked against the world size and the graph fingerprint with
  a :class:`~rannc_hf.errors.PlanMismatchError`; else the automatic planner when installed; else
  ``config.num_stages``/``dp_size``/``num_microbatches`` with balanced cuts), capture the model with
  ``torch.export`` at **microbatch** size, build this rank's stages and process groups. A new plan is
  saved to ``config.plan_file`` (rank 0, atomically) when that file does not exist yet.
* **forward = the whole step.** Pipeline schedules interleave forward and backward of microbatches, so
  ``forward`` runs both and keeps the new gradients aside. It returns the loss (mean over microbatches
  and replicas, identical on every rank). ``loss.backward()`` then adds ``grad_output x new_grads``
  into ``.grad``: user-side scaling (``(loss * s).backward()``) and gradient accumulation across calls
  (``.grad`` adds up until ``zero_grad``) behave as on one GPU. Without ``backward()`` nothing reaches
  ``.grad``. Under ``torch.no_grad()`` forward only runs (no gradients); ``eval()`` captures the model
  again in eval mode (dropout off, BatchNorm running statistics).
* **Gradient sync.** Every call averages the new gradients over the dp replicas (one flattened
  all-reduce per dtype) and sums the gradients of parameters read on several pipeline ranks (tied
  embeddings: GPT-2 ``wte``/``lm_head``, T5 ``shared`` in 3 places) over the ranks holding them, so tied
  copies stay identical after every optimizer step. Inside ``with model.no_sync():`` the dp all-reduce
  is skipped; the ``backward()`` of the next synchronised call averages the accumulated ``.grad`` once.
* **Optimizer.** The optimizer passed in is mutated in place: each param group keeps only this rank's
  parameters (same object, same hyperparameters). ``clip_grad_norm_`` computes the global norm over
  all stages (parameters held on several ranks counted once), returns it, same on every rank.
* **Checkpoints.** ``state_dict()`` gathers the full model under the original keys (tied aliases
  included) on every rank with ``dist.broadcast`` (no pickling); ``load_state_dict`` takes a full state
  dict and keeps what is local. ``optimizer_state_dict()`` / ``load_optimizer_state_dict()`` key the
  optimizer state by parameter FQN, so a checkpoint written under one plan loads under another.
* **Precision.** ``config.precision``: fp32 | bf16 | fp16 through ``torch.autocast`` inside each stage
  (parameters and gradients stay fp32). fp16 uses :attr:`scaler` (:class:`~rannc_hf.runtime.amp.LossScaler`):
  the loss is scaled inside the pipeline, gradients are unscaled before they reach ``.grad``, the
  inf/nan check is all-reduced over every rank and an overflowing step is skipped by all ranks together
  (``optimizer.step`` of the wrapped optimizer becomes a no-op for that step; :attr:`overflow` says so).
* **Recompute.** A stage whose plan says ``recompute == "full"`` (or ``config.recompute == "full"``)
  runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved). Note: BatchNorm running
  statistics are updated again by the recomputation (as with any activation checkpointing).
* **Changing shapes.** A batch with another shape/dtype signature is captured again and built with the
  same cuts when they fit (cached per signature; all ranks decide alike because they see the same global
  batch). If the batch size is not a multiple of ``dp_size x num_microbatches``, or the new graph would
  put different parameters on this rank, a :class:`~rannc_hf.errors.ShapeMismatchError` says how to pad
  or bucket. Each new shape costs a capture (about a second for small models): bucket lengths.
* **Single-stage fast path.** With one stage and one replica (one process) and no offload, no pipeline is
  built: ``forward`` calls the user's module directly (on the device, under ``torch.autocast`` for
  bf16/fp16, through ``torch.compile`` when :attr:`compile_enabled`). With one microbatch and no fp16 scaler
  it returns the model's own output, so ``loss.backward()`` is plain autograd (no extra pass, same memory as
  plain PyTorch). With ``num_microbatches > 1`` (or fp16) it loops over the microbatches with a backward
  each and hands the gradients to ``loss.backward()`` as above. The optimizer is left untouched (every
  parameter is local); ``state_dict``/``clip_grad_norm_`` are the module's own. One stage with
  ``dp_size > 1`` keeps the general path (the runtime's flattened gradient all-reduce, not DDP).
  ``RANNC_HF_FAST_PATH=0`` turns the fast path off.
* **Compile.** ``config.compile``: ``true`` compiles every stage graph (and the fast-path module) with
  ``torch.compile``; ``auto`` does so on CUDA with bf16/fp16 compute, never on CPU; ``false`` never.
  ``RANNC_HF_COMPILE_BACKEND`` picks the backend (default ``inductor``).
* **Forward only / logits.** Under ``torch.no_grad()`` the stages run forward point to point and ``forward``
  returns ``PipelineOutput(loss, logits, outputs)``: the model's other outputs come from the last stage,
  broadcast to every rank of the pipeline (and gathered over replicas for a global batch).
  :meth:`eval_forward` evaluates a whole batch per replica and returns a dict (what ``RanncTrainer`` uses).
* **Building early.** :meth:`build` plans, captures and builds from an example batch; :meth:`set_optimizer`
  narrows an optimizer created after wrapping. A capture after :meth:`_release_nonlocal` (GPU: parameters of
  other stages emptied) gives the emptied tensors shape-only stand-ins for its duration.
* **Offload.** A stage whose offload mode (``config.offload``; with ``auto`` the plan's per-stage choice,
  none on CPU devices) is ``optimizer`` | ``params`` | ``all`` trains through an
  :class:`~rannc_hf.offload.OffloadEngine` on its rank (:mod:`rannc_hf.runtime.offload_stage`): blocks are
  the model's repeated layers inside the stage, ``offload_enter``/``offload_exit`` fences sit in the stage
  graph, gradients go to fp32 host buffers, ``clip_grad_norm_`` adds their norm to the global one, the
  user's ``optimizer.step()`` runs the engine's step, ``state_dict``/``optimizer_state_dict`` gather the
  host masters/state. The host-memory need is checked per node first (:class:`~rannc_hf.errors.OffloadError`).
  See ``docs/offload.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..capture import capture
from ..capture.export import batch_size_of, normalize_batch
from ..capture.graph import Graph
from ..config import RanncConfig
from ..errors import PlanMismatchError, ShapeMismatchError
from .amp import LossScaler
from .grads import allreduce_sum_, any_nonfinite, global_grad_norm, restore_grads, stash_grads
from .mesh import Mesh, default_device, init_distributed
from .pipeline import StagePipeline
from .planning import Layout, cuts_for, decide_layout
from .stages import batch_inputs, stage_specs

log = logging.getLogger(__name__)


@dataclass
class PipelineOutput:
    """What ``forward`` returns for models whose output has a ``loss`` field (Hugging Face style)."""

    loss: torch.Tensor
    logits: Any = None
    outputs: dict = field(default_factory=dict)   # forward-only calls: every other model output, by key

    def __getitem__(self, key):
        if key in ("loss", 0):
            return self.loss
        raise KeyError(key)

    def keys(self):
        return ["loss"]

    def to_tuple(self) -> tuple:
        return (self.loss,)


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


class _Payload:
    __slots__ = ("params", "grads", "synced")

    def __init__(self, params, grads, synced):
        self.params, self.grads, self.synced = params, grads, synced


class _CarryGrads(torch.autograd.Function):
    """Returns the loss; its backward adds ``grad_output * new_grads`` into ``.grad``."""

    @staticmethod
    def forward(ctx, anchor, loss, owner, payload):
        ctx.owner, ctx.payload = owner, payload
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.owner._accumulate(ctx.payload, grad_output)
        return None, None, None, None


class RanncModule(nn.Module):
    """Wrap ``model`` (any ``nn.Module`` whose forward returns a loss) to train as a pipeline. See the module doc."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[RanncConfig] = None, *, example_batch: Any = None, plan=None,
                 local_batch: bool = False, graph: Optional[Graph] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.module = model
        self.optimizer = optimizer
        self.config = config if config is not None else RanncConfig.from_env()
        self.local_batch = local_batch
        self.device = torch.device(device) if device is not None else default_device()
        self._given_plan = plan
        self._given_graph = graph
        self.plan = None
        self.mesh: Optional[Mesh] = None
        self.layout: Optional[Layout] = None
        self._variants: dict = {}
        self._primary: Optional[_Variant] = None
        self._sync = True
        self._unsynced = False
        self.scaler = LossScaler(enabled=self.config.precision == "fp16")
        self._debug_inject_inf = False   # tests: pretend this rank saw an inf gradient on the next call
        self._full_meta: dict[int, tuple] = {}
        self._opt_groups_fqn: Optional[list] = None
        self._name_of = {id(p): n for n, p in model.named_parameters()}
        self._offload = None            # rannc_hf.runtime.offload_stage.StageOffload when a local stage offloads
        self._fast = False              # single-stage fast path (see _build_fast)
        self._fast_fn: Any = None       # the module the fast path calls (compiled or not)
        self.eval_outputs = True        # forward-only calls return the model's other outputs (logits)
        if example_batch is not None:
            self.build(example_batch)

    # ---- public properties ---------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank if self.mesh else 0

    @property
    def dp_size(self) -> int:
        return self.mesh.dp_size if self.mesh else 1

    @property
    def pp_rank(self) -> int:
        return self.mesh.pp_rank if self.mesh else 0

    @property
    def num_stages(self) -> int:
        """Pipeline ranks (interleaved schedules run ``layout.virtual_stages`` chunks on each)."""
        return self.layout.num_stages // self.layout.virtual_stages if self.layout else 1

    @property
    def num_microbatches(self) -> int:
        return self.layout.num_microbatches if self.layout else 1

    @property
    def is_first_stage(self) -> bool:
        return self._primary.pipe.has_first if self._primary else True

    @property
    def is_last_stage(self) -> bool:
        return self._primary.pipe.has_last if self._primary else True

    @property
    def overflow(self) -> bool:
        """fp16: an overflow happened since the last optimizer step (it will be skipped on every rank)."""
        return self.scaler.found_inf

    def local_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters this rank's stages own (what its optimizer steps)."""
        return list(self._primary.params) if self._primary else list(self.module.parameters())

    def build(self, example_batch: Any) -> "RanncModule":
        """Decide the layout, capture and build now from an example batch (the same kind of batch ``forward``
        gets: global, or this replica's with ``local_batch=True``), in the current train/eval mode. Returns self.
        Collective: every rank calls it with a batch of the same shape."""
        if hasattr(example_batch, "keys") and not isinstance(example_batch, dict):
            example_batch = dict(example_batch)       # BatchEncoding and other mappings
        kwargs = example_batch if isinstance(example_batch, dict) else {}
        self._ensure_built(*self._split_call((), kwargs, example_batch), train=self.module.training)
        return self

    @property
    def built(self) -> bool:
        """True once the layout is decided and this rank's part is built (first call or :meth:`build`)."""
        return self._fast or self._primary is not None

    def set_optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
        """Use ``optimizer`` (created over the original model's parameters, e.g. after wrapping): it is narrowed
        in place to this rank's parameters now if the module is built, else when it is. Returns it."""
        self.optimizer = optimizer
        if optimizer is not None and self.built:
            self._localize_optimizer()
        return optimizer

    # ---- batch handling ------------------------------------------------------------------
    @staticmethod
    def _split_call(args: tuple, kwargs: dict, example: Any = None) -> tuple[dict, dict]:
        """(tensor inputs keyed like Graph.inputs, other keyword values)."""
        if example is not None and not isinstance(example, dict):
            args, kwargs = normalize_batch(example)
        tensors, other = {}, {}
        for i, a in enumerate(args):
            (tensors if isinstance(a, torch.Tensor) else other)[f"arg{i}"] = a
        for k, v in kwargs.items():
            (tensors if isinstance(v, torch.Tensor) else other)[k] = v
        return tensors, other

    def _signature(self, tensors: dict, other: dict, train: bool) -> tuple:
        return (train, tuple((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in tensors.items()),
                tuple(sorted((k, repr(v)) for k, v in other.items())), self._batch_of(tensors))

    def _batch_of(self, tensors: dict) -> int:
        return batch_size_of((), tensors)

    def _check_batch(self, B: int) -> int:
        """Per-replica rows for a batch of B rows (global or local); a clear error if it does not divide."""
        dp, m = (1 if self.local_batch else self.layout.dp_size), self.layout.num_microbatches
        if B % (dp * m):
            need = dp * m
            raise ShapeMismatchError(
                f"batch of {B} samples cannot be split into {self.layout.dp_size if not self.local_batch else 1} "
                f"replica(s) x {m} microbatches; use a batch size that is a multiple of {need} (pad the last "
                f"batch or use drop_last=True in the DataLoader), or set num_microbatches to a divisor of it")
        return B // dp

    def _shard(self, tensors: dict, rows: int) -> dict:
        if self.local_batch or self.layout.dp_size == 1:
            return tensors
        lo = self.dp_rank * rows
        return {k: v[lo:lo + rows] for k, v in tensors.items()}

    # ---- building ------------------------------------------------------------------------
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
        world = dist.get_world_size()
        plan = self._given_plan
        pf = self.config.plan_file
        if plan is None and pf and os.path.exists(pf):
            from ..planner.plan import Plan

            plan = Plan.load(pf)
            self._plan_from_file = True
        if plan is not None:
            plan.check_world(world)
        batch = {**tensors, **other}
        self.layout = decide_layout(self.module, batch, self.config, world_size=world, batch_size=B,
                                    plan=plan, batch_is_local=self.local_batch)
        pp = self.layout.num_stages // self.layout.virtual_stages
        self.mesh = Mesh(pp, self.layout.dp_size, self.config.collective_timeout_s, self.device)

    # ---- single-stage fast path ------------------------------------------------------------
    def _wants_offload(self) -> bool:
        try:   # the offload wiring's own rule (auto: the plan's per-stage choice, none on CPU devices)
            from .offload_stage import stage_modes
        except ImportError:
            stage_modes = None
        if stage_modes is not None:
            return any(m != "none" for m in stage_modes(self, None))
        if self.config.offload in ("optimizer", "params", "all"):
            return True
        plan = self.layout.plan if self.layout is not None else None
        return bool(plan is not None and any(getattr(s, "offload", "none") not in ("none", "", None)
                                             for s in plan.stages))

    def _fast_eligible(self) -> bool:
        """One stage, one replica, no offload: run the user's module directly (``RANNC_HF_FAST_PATH=0`` disables)."""
        lay = self.layout
        return (lay.num_stages == 1 and lay.dp_size == 1 and not self._wants_offload()
                and os.environ.get("RANNC_HF_FAST_PATH", "1") != "0")

    def _build_fast(self, tensors: dict, other: dict, B: int, train: bool) -> None:
        """The plan (the planner's, a saved one checked against a capture, or a one-stage plan of a capture),
        the module on the device, the optimizer hooks; no stage modules, no process groups beyond the trivial."""
        from ..planner.plan import Plan

        lay = self.layout
        rows = self._check_batch(B)
        from_file = getattr(self, "_plan_from_file", False)
        if lay.plan is not None and not from_file:
            self.plan = lay.plan
        else:
            mb = rows // lay.num_microbatches
            example = {k: v[:mb] for k, v in tensors.items()}
            example.update(other)
            g = self._given_graph
            if g is None:
                was = self.module.training
                self.module.train(train)
                try:
                    g = capture(self.module, example)
                finally:
                    self.module.train(was)
            if from_file:
                lay.plan.check_graph(g)
                self.plan = lay.plan
            else:
                self.plan = Plan.from_cuts(g, [], num_microbatches=lay.num_microbatches, dp_size=1,
                                           schedule=lay.schedule)
        pf = self.config.plan_file
        if pf and not os.path.exists(pf) and dist.get_rank() == 0:
            self.plan.save(pf)
        self.module.to(self.device)       # in place: the optimizer keeps the same parameter objects
        self._fast = True
        self._fast_fn = self._maybe_compile(self.module)
        self._localize_optimizer()

    def _autocast(self):
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def _chunks(self, args: tuple, kwargs: dict, m: int) -> list[tuple[tuple, dict]]:
        """The batch (tensors moved to the device) as ``m`` equal microbatches along dim 0."""
        dev = self.device

        def mv(v):
            return v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v

        args = tuple(mv(a) for a in args)
        kwargs = {k: mv(v) for k, v in kwargs.items()}
        if m == 1:
            return [(args, kwargs)]
        B = self._batch_of(self._split_call(args, kwargs)[0])
        mb = B // m

        def cut(v, i):
            return v[i * mb:(i + 1) * mb] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v

        return [(tuple(cut(a, i) for a in args), {k: cut(v, i) for k, v in kwargs.items()}) for i in range(m)]

    def _fast_forward(self, args: tuple, kwargs: dict):
        m = self.layout.num_microbatches
        self._check_batch(self._batch_of(self._split_call(args, kwargs)[0]))
        chunks = self._chunks(args, kwargs, m)
        fn = self._fast_fn
        params = [p for p in self.module.parameters() if p.requires_grad]
        backward = torch.is_grad_enabled() and bool(params)
        if m == 1 and not (backward and self.scaler.enabled):
            # plain autograd: the user's loss.backward() is the model's own backward (M == 1, no fp16 scaler),
            # or a forward-only call returning the model's whole output (logits included)
            (a, kw), = chunks
            with self._autocast():
                out = fn(*a, **kw)
            return _float_loss(out)
        if not backward:
            with torch.no_grad():
                outs = []
                for a, kw in chunks:
                    with self._autocast():
                        outs.append(fn(*a, **kw))
            return _merge_outputs(outs)
        scale = self.scaler.scale if self.scaler.enabled else 1.0
        saved = stash_grads(params)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        is_tensor = True
        try:
            for a, kw in chunks:
                with self._autocast():
                    out = fn(*a, **kw)
                is_tensor = isinstance(out, torch.Tensor)
                loss = _loss_value(out).float()
                (loss * scale if scale != 1.0 else loss).backward()
                total += loss.detach()
                del out, loss
        finally:
            new = restore_grads(params, saved)
        div = float(m) * scale
        for g in new:
            if g is not None:
                g.div_(div)
        if self.scaler.enabled:
            bad = any_nonfinite(new, None, self.device, force=self._debug_inject_inf)
            self._debug_inject_inf = False
            self.scaler.update(bad)
            if bad:
                new = [None] * len(new)
        anchor = torch.empty(0, requires_grad=True)
        loss = _CarryGrads.apply(anchor, (total / m).detach(), self, _Payload(params, new, self._sync))
        return loss if is_tensor else PipelineOutput(loss=loss)

    def _build_variant(self, example: dict, train: bool) -> _Variant:
        was = self.module.training
        self.module.train(train)
        try:
            g = self._given_graph if (self._given_graph is not None and not self._variants and train) else None
            if g is None:
                if self._primary is not None and self._local_on_device():
                    # a re-capture (new shape / eval): local weights already live on the device
                    example = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                with self._stand_ins():
                    g = capture(self.module, example)
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
        recompute = ["full" if self.config.recompute == "full" else "none"] * lay.num_stages
        if lay.plan is not None and len(lay.plan.stages) == lay.num_stages:
            recompute = [s.recompute if s.recompute in ("none", "full") else r
                         for s, r in zip(lay.plan.stages, recompute)]
        pipe = StagePipeline(g, cuts, mesh, lay.num_microbatches, lay.schedule, virtual_stages=lay.virtual_stages,
                             model=self.module, precision=self.config.precision, recompute=recompute,
                             compile_backend=self._compile_backend())
        holders: dict[str, list[int]] = {}
        for spec in stage_specs(g, cuts):
            for name in spec.params:
                holders.setdefault(name, set()).add(spec.index % mesh.pp_size)
        holders = {k: sorted(v) for k, v in holders.items()}
        names = pipe.param_names
        params = pipe.params
        var = _Variant(g, cuts, pipe, params, names, holders)
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

    @property
    def compile_enabled(self) -> bool:
        """``config.compile``: ``true``/``false`` as given; ``auto`` compiles on CUDA with bf16/fp16 compute (where
        ``torch.compile`` pays: 1.56x eager on GPT-2 1.3B, H200) and not on CPU (compile time outweighs the gain)."""
        c = str(self.config.compile).lower()
        if c in ("true", "false"):
            return c == "true"
        return self.device.type == "cuda" and self.config.precision in ("bf16", "fp16")

    def _compile_backend(self) -> Optional[str]:
        """The ``torch.compile`` backend, or None when compile is off (``RANNC_HF_COMPILE_BACKEND`` overrides
        ``inductor``, e.g. ``aot_eager`` for fast CPU tests)."""
        if not self.compile_enabled:
            return None
        return os.environ.get("RANNC_HF_COMPILE_BACKEND") or "inductor"

    def _maybe_compile(self, module: nn.Module) -> nn.Module:
        """``module`` or its ``torch.compile`` wrapper per ``config.compile`` (see :attr:`compile_enabled`)."""
        backend = self._compile_backend()
        return module if backend is None else torch.compile(module, backend=backend)

    def _share_outputs(self, var: _Variant, ex: Optional[list]) -> dict:
        """The last stage's other outputs (per microbatch) as full-batch tensors on every rank of the pipeline
        (``dist.broadcast`` over the pp group, shapes/dtypes from the capture), gathered over the dp replicas for
        a global batch. Keys are the model's output keys (``logits``, ...)."""
        from .stages import output_specs, value_meta

        g, mesh, m = var.graph, self.mesh, self.layout.num_microbatches
        names = output_specs(g, var.cuts)[1]
        if not names:
            return {}
        keymap = dict(zip(g.outputs, g.output_keys)) if len(g.outputs) == len(g.output_keys) else {}
        last = mesh.rank_of(mesh.dp_rank, (len(var.cuts)) % mesh.pp_size)
        out = {}
        for j, name in enumerate(names):
            meta = value_meta(g, name)
            batched = meta.dim() > 0 and meta.shape[0] == g.batch_size
            if ex is not None:
                parts = [e[j] for e in ex]
                t = torch.cat(parts) if batched else parts[0]
                t = t.to(self.device).contiguous()
            else:
                shape = ((meta.shape[0] * m,) + tuple(meta.shape[1:])) if batched else tuple(meta.shape)
                t = torch.empty(tuple(int(x) for x in shape), dtype=meta.dtype, device=self.device)
            if mesh.pp_size > 1:
                dist.broadcast(t, src=last, group=mesh.pp_group)
            if batched and mesh.dp_size > 1 and not self.local_batch:
                parts = [torch.empty_like(t) for _ in range(mesh.dp_size)]
                dist.all_gather(parts, t, group=mesh.dp_group)
                t = torch.cat(parts)
            out[keymap.get(name, f"output{j + 1}")] = t
        return out

    def eval_forward(self, *args, **kwargs) -> "EvalOutput":
        """Forward only, for evaluation/prediction (used by ``RanncTrainer.prediction_step``): the batch given is
        evaluated whole by this rank's pipeline (no data-parallel split), under ``torch.no_grad()``; returns a dict
        ``{"loss": ..., "logits": ..., ...}`` identical on every rank of the pipeline. A batch that does not split
        into the microbatches is padded by repeating its last row (outputs are cut back; its loss then counts the
        repeated row)."""
        tensors, _ = self._split_call(args, kwargs)
        B = self._batch_of(tensors)
        m = self.layout.num_microbatches if self.layout is not None else 1
        pad = (-B) % m

        def padded(v):
            if pad and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B:
                return torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])
            return v

        prev = self.local_batch
        self.local_batch = True
        try:
            with torch.no_grad():
                out = self(*(padded(a) for a in args), **{k: padded(v) for k, v in kwargs.items()})
        finally:
            self.local_batch = prev
        res = EvalOutput()
        if isinstance(out, torch.Tensor):
            res["loss"] = out
            return res
        if isinstance(out, PipelineOutput):
            items = {"loss": out.loss, **out.outputs}
            if out.logits is not None and "logits" not in items:
                items["logits"] = out.logits
        elif isinstance(out, dict):
            items = dict(out)
        else:
            items = {"loss": _loss_value(out)}
        for k, v in items.items():
            if isinstance(v, torch.Tensor) and pad and v.dim() > 0 and v.shape[0] == B + pad:
                v = v[:B]
            res[k] = v.detach() if isinstance(v, torch.Tensor) else v
        return res

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

    # ---- the step ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        tensors, other = self._split_call(args, kwargs)
        train = self.training
        var = self._ensure_built(tensors, other, train)
        if self._fast:
            return self._fast_forward(args, kwargs)
        lay, mesh, pipe = self.layout, self.mesh, var.pipe
        rows = self._check_batch(self._batch_of(tensors))
        inputs = None
        if pipe.has_first:
            shard = self._shard(tensors, rows)
            inputs = [t.to(self.device, non_blocking=True) for t in batch_inputs(var.graph, shard)]
        backward = torch.is_grad_enabled() and bool(var.params)
        m = lay.num_microbatches
        extras: dict = {}
        if backward:
            pipe.loss_scale = self.scaler.scale
            saved = stash_grads(var.params)
            if self._offload is not None:
                self._offload.before_run()
            try:
                loss_sum = pipe.run(inputs, train=True)
            finally:
                new = restore_grads(var.params, saved)
            if self._offload is not None:
                new = self._offload.collect(var, new)
            div = float(m) * (self.scaler.scale if self.scaler.enabled else 1.0)
            for g in new:
                if g is not None:
                    g.div_(div)
            if self.scaler.enabled:
                bad = any_nonfinite(new, None, self.device, force=self._debug_inject_inf)
                self._debug_inject_inf = False
                self.scaler.update(bad)
                if bad:
                    new = [None] * len(new)
            for _, idx, grp in var.shared_groups:
                sub = [new[i] for i in idx]
                allreduce_sum_([var.params[i] for i in idx], sub, grp)
                for i, gi in zip(idx, sub):
                    new[i] = gi
            if self._sync and mesh.dp_size > 1:
                allreduce_sum_(var.params, new, mesh.dp_group, divide_by=float(mesh.dp_size))
        elif getattr(self, "_offload", None) is None:
            # forward only: the stages run point to point; the model's other outputs (logits) come back too
            loss_sum, ex = pipe.forward_only(inputs)
            extras = self._share_outputs(var, ex) if self.eval_outputs else {}
        else:
            with torch.no_grad():
                loss_sum = pipe.run(inputs, train=False)
        loss = self._share_loss(loss_sum, m)
        if backward:
            anchor = torch.empty(0, requires_grad=True)
            payload = _Payload(var.params, new, self._sync)
            if self._offload is not None:
                self._offload.store(var, new, payload)
            loss = _CarryGrads.apply(anchor, loss, self, payload)
        if "loss" in var.graph.output_keys:
            if not backward and extras:
                logits = extras.get("logits", next(iter(extras.values())))
                return PipelineOutput(loss=loss, logits=logits, outputs=extras)
            return PipelineOutput(loss=loss)
        return loss

    def _share_loss(self, loss_sum: Optional[torch.Tensor], m: int) -> torch.Tensor:
        t = torch.zeros((), dtype=torch.float32, device=self.device)
        if loss_sum is not None:
            t = (loss_sum / m).to(self.device, torch.float32)
        if dist.get_world_size() > 1:
            dist.all_reduce(t)
        return (t / self.mesh.dp_size).detach()

    def _accumulate(self, payload: _Payload, grad_output: torch.Tensor) -> None:
        if payload.grads is None:
            raise RuntimeError("the gradients of this RanncModule step were already applied; call forward again "
                               "(backward through the same loss twice is not supported)")
        go = grad_output.detach()
        one = bool(go.numel() == 1 and float(go) == 1.0)
        if self._offload is not None:
            self._offload.accumulate(payload, go, payload.synced and self._unsynced)
        for p, g in zip(payload.params, payload.grads):
            if g is None:
                continue
            c = g if one else g * go.to(g.dtype)
            if p.grad is None:
                p.grad = c
            else:
                p.grad.add_(c)
        payload.grads = None
        if not payload.synced:
            self._unsynced = True
        elif self._unsynced and self.mesh is not None and self.mesh.dp_size > 1:
            var = self._primary
            gs = [p.grad for p in var.params]
            allreduce_sum_(var.params, gs, self.mesh.dp_group, divide_by=float(self.mesh.dp_size))
            for p, g in zip(var.params, gs):
                if g is not None and p.grad is None:
                    p.grad = g
            self._unsynced = False

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the dp all-reduce for calls inside; the next synchronised call's ``backward`` averages ``.grad``."""
        prev = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = prev

    # ---- clipping ------------------------------------------------------------------------
    def _owned(self, name: str) -> bool:
        return self._primary.holders.get(name, [self.pp_rank])[0] == self.pp_rank

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip ``.grad`` of all stages by their global norm (shared parameters counted once); returns it."""
        var = self._primary
        if var is None:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, norm_type)
        owned = [p.grad for p, n in zip(var.params, var.names) if self._owned(n)]
        if self._offload is not None:
            owned += self._offload.owned_grads(var, self._owned)
        total = global_grad_norm(owned, self.mesh.pp_group, float(norm_type), self.device)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in var.params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        if self._offload is not None:
            self._offload.scale_grads_(coef)
        return total

    # ---- checkpoints ---------------------------------------------------------------------
    def _owner_rank_of(self) -> dict[int, int]:
        """id(tensor) -> global rank that holds the authoritative copy (replica 0, first holding stage)."""
        var, mesh = self._primary, self.mesh
        if var is None:   # fast path / not built: everything is local to this (only) rank
            return {id(t): dist.get_rank() if dist.is_initialized() else 0
                    for t in list(self.module.parameters()) + list(self.module.buffers())}
        out = {}
        for name, pps in var.holders.items():
            try:
                obj = _fetch(self.module, name)
            except AttributeError:  # a constant lifted by export, not model state
                continue
            if isinstance(obj, torch.Tensor):
                out[id(obj)] = mesh.rank_of(0, pps[0])
        return out

    def _broadcast_tensors(self, items: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """items: (src rank, tensor to send on src / buffer of the right shape elsewhere), same order everywhere."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        out: list = [None] * len(items)
        keys = sorted({(src, str(t.dtype)) for src, t in items})
        for src, dt in keys:
            ids = [i for i, (s, t) in enumerate(items) if s == src and str(t.dtype) == dt]
            ts = [items[i][1].detach().to(self.device) for i in ids]
            flat = _flatten_dense_tensors(ts) if ts else None
            if dist.get_world_size() > 1:
                dist.broadcast(flat, src=src)
            for i, t in zip(ids, _unflatten_dense_tensors(flat, ts)):
                out[i] = t.cpu().clone()
        return out

    def state_dict(self, *args, **kwargs) -> dict:  # noqa: D401 - nn.Module override
        """The full model state under the original keys (tied aliases share one tensor), on every rank."""
        if self._primary is None:
            return self.module.state_dict(*args, **kwargs)
        owners = self._owner_rank_of()
        sd = self.module.state_dict(keep_vars=True)
        uniq: dict[int, torch.Tensor] = {}
        for v in sd.values():
            if isinstance(v, torch.Tensor):
                uniq.setdefault(id(v), v)
        order = [i for i in uniq if i in owners]
        rank = dist.get_rank()
        items = []
        for i in order:
            t = uniq[i]
            shape, dtype = self._full_meta.get(i, (tuple(t.shape), t.dtype))
            val = t.data if self._offload is None else self._offload.value_of(t)
            buf = val if owners[i] == rank else torch.empty(shape, dtype=dtype)
            items.append((owners[i], buf))
        got = dict(zip(order, self._broadcast_tensors(items)))
        out = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                out[k] = v
            elif id(v) in got:
                out[k] = got[id(v)]
            else:
                out[k] = v.detach().clone()
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Load a full state dict (original keys) into the local parameters/buffers."""
        if self._primary is None:
            return self.module.load_state_dict(state_dict, strict=strict)
        own = self.module.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.module).__name__}: "
                               f"missing keys {missing}, unexpected keys {unexpected}")
        with torch.no_grad():
            for k, t in own.items():
                if k in state_dict and isinstance(t, torch.Tensor) and t.numel() > 0:
                    if self._offload is not None and self._offload.load_value_(t, state_dict[k]):
                        continue
                    t.data.copy_(state_dict[k].to(t.device, t.dtype))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def optimizer_state_dict(self) -> dict:
        """``{"state": {fqn: {key: tensor}}, "param_groups": [{hyperparameters, "params": [fqn, ...]}]}``, gathered."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("RanncModule was built without an optimizer")
        owners = self._owner_rank_of()
        rank = dist.get_rank()
        mine: dict[str, dict] = {}
        ostate = opt.state if self._offload is None else self._offload.optimizer_state(opt)
        for p in self.local_parameters():
            if owners.get(id(p)) == rank and p in ostate:
                mine[self._name_of[id(p)]] = ostate[p]
        state: dict[str, dict] = {}
        world = dist.get_world_size()
        for src in range(world):
            if src == rank:
                desc = {fqn: {k: ([list(v.shape), str(v.dtype).replace("torch.", "")] if isinstance(v, torch.Tensor)
                                  else {"value": v}) for k, v in st.items()} for fqn, st in mine.items()}
                data = torch.tensor(list(json.dumps(desc, sort_keys=True).encode()), dtype=torch.uint8)
                n = torch.tensor([data.numel()], dtype=torch.int64)
            else:
                n = torch.zeros(1, dtype=torch.int64)
            if world > 1:
                n = n.to(self.device)
                dist.broadcast(n, src=src)
                n = n.cpu()
            if src != rank:
                data = torch.empty(int(n.item()), dtype=torch.uint8)
            if world > 1:
                d = data.to(self.device)
                dist.broadcast(d, src=src)
                data = d.cpu()
            desc = json.loads(bytes(data.tolist()).decode())
            items, where = [], []
            for fqn in sorted(desc):
                for k in sorted(desc[fqn]):
                    v = desc[fqn][k]
                    if isinstance(v, dict):
                        state.setdefault(fqn, {})[k] = v["value"]
                        continue
                    shape, dt = v
                    t = mine[fqn][k] if src == rank else torch.empty(shape, dtype=getattr(torch, dt))
                    items.append((src, t))
                    where.append((fqn, k))
            for (fqn, k), t in zip(where, self._broadcast_tensors(items)):
                state.setdefault(fqn, {})[k] = t
        groups = []
        for fqns, g in zip(self._opt_groups_fqn or [], opt.param_groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            groups.append({**hyper, "params": list(fqns)})
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Load a gathered optimizer state (by parameter FQN) into the local optimizer."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError("RanncModule was built without an optimizer")
        if len(sd["param_groups"]) != len(opt.param_groups):
            raise PlanMismatchError(f"optimizer state has {len(sd['param_groups'])} param groups, the optimizer "
                                    f"{len(opt.param_groups)}")
        for g, saved in zip(opt.param_groups, sd["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    g[k] = v
        if self._offload is not None:
            fq = {id(p): self._name_of.get(id(p)) for p in self._primary.params}
            self._offload.load_optimizer_state(opt, {p: sd["state"][fq[id(p)]] for p in self._primary.params
                                                     if fq[id(p)] in sd["state"]})
            return
        for p in self.local_parameters():
            fqn = self._name_of.get(id(p))
            st = sd["state"].get(fqn)
            if st is None:
                continue
            opt.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.dim() > 0 else
                                v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}


def _fetch(root: Any, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class EvalOutput(dict):
    """What :meth:`RanncModule.eval_forward` returns: a dict (``loss``, ``logits``, ...) with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def _same_cuts(plan, g: Graph, cuts: list) -> bool:
    """True if ``plan``'s stages end at ``cuts`` of ``g`` (same op count, same cut positions)."""
    return int(plan.num_ops or len(g.ops)) == len(g.ops) and list(plan.cuts) == [int(c) for c in cuts]


def _loss_value(out) -> torch.Tensor:
    """The scalar loss of a model call (``out.loss``, ``out["loss"]``, ``out[0]`` or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "loss", None) is not None:
        return out.loss
    if isinstance(out, dict):
        return out["loss"]
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find the loss in a model output of type {type(out).__name__}")


def _float_loss(out):
    """``out`` with its loss as fp32 (autocast may leave it in bf16/fp16); other fields untouched."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.dtype != torch.float32:
        try:
            out["loss"] = loss.float()
        except Exception:  # noqa: BLE001 - an output type that cannot be updated keeps its dtype
            pass
    return out


def _merge_outputs(outs: list):
    """Forward-only microbatch outputs as one: mean loss, other batch-leading tensors concatenated."""
    if isinstance(outs[0], torch.Tensor):
        return torch.stack([o.detach().float() for o in outs]).mean()
    loss = torch.stack([_loss_value(o).detach().float() for o in outs]).mean()
    logits = getattr(outs[0], "logits", None)
    if logits is None and isinstance(outs[0], dict):
        logits = outs[0].get("logits")
    if isinstance(logits, torch.Tensor):
        logits = torch.cat([o["logits"] if isinstance(o, dict) else o.logits for o in outs])
    return PipelineOutput(loss=loss, logits=logits)
