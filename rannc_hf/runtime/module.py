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
  all stages (parameters held on several ranks counted once), returns it, same on every rank. A rank whose
  stages read no trainable parameter (a loss-only last stage, a run of parameter-free ops) still runs the
  training schedule (it passes gradients back) and every collective; its optimizer keeps empty param groups,
  so ``step()`` does nothing there. Whether to train is decided from the whole model, the same on every rank.
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
  runs under ``torch.utils.checkpoint`` in segments, RNG state preserved: reentrant where a segment is fed by
  gradients (its host cost is one forward), non-reentrant for a stage's first segments, offloaded and compiled
  ones. Note: BatchNorm running
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
  ``torch.compile``; ``auto`` does so on CUDA with bf16/fp16 compute, never on CPU; ``false`` never. A compiled
  encoder (bidirectional attention) runs its captured graph rather than the fast path: under ``torch.compile`` its
  own forward builds the all-true padding mask eager skips, and attention fell to fp32 math (BERT-large on an H200:
  0.88x eager that way, 1.33x eager through the captured graph).
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
import logging
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..capture.export import batch_size_of, normalize_batch
from ..capture.graph import Graph
from ..config import RanncConfig
from ..errors import ShapeMismatchError
from .amp import LossScaler
from .building import _BuildMixin, _Variant
from .carry import _CarryGrads, _Payload, finish_new_grads
from .evaluation import EvalOutput, PipelineOutput, _EvalMixin
from .fastpath import _FastPathMixin
from .grads import add_grads_, allreduce_sum_, global_grad_norm, restore_grads, scale_grads_, stash_grads
from .mesh import Mesh, resolve_device
from .oom import explain_oom
from .planning import Layout
from .state import _StateMixin
from .stages import batch_inputs

log = logging.getLogger(__name__)

__all__ = ["RanncModule", "PipelineOutput", "EvalOutput"]

# RanncModule composes one concern per module: building.py (layout, capture, stages, optimizer narrowing),
# fastpath.py (single-stage fast path), evaluation.py (forward only, logits, eval_forward), state.py
# (state_dict / optimizer state by broadcast from owners), carry.py (new gradients -> .grad). The pipeline step,
# gradient sync and clipping stay here.


class RanncModule(_BuildMixin, _FastPathMixin, _EvalMixin, _StateMixin, nn.Module):
    """Wrap ``model`` (any ``nn.Module`` whose forward returns a loss) to train as a pipeline. See the module doc."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[RanncConfig] = None, *, example_batch: Any = None, plan=None,
                 local_batch: bool = False, graph: Optional[Graph] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.module = model
        self.optimizer = optimizer
        self.config = config if config is not None else RanncConfig.from_env()
        self.local_batch = local_batch
        self.device = resolve_device(device)
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

    def offload_stats(self) -> Optional[dict]:
        """This rank's offload engine counters (bytes each way, host step and rest-group step time, steps; see
        :meth:`rannc_hf.offload.OffloadEngine.stats`), or None when no local stage offloads. Waits for the
        engine's background step."""
        return self._offload.stats() if self._offload is not None else None

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
            self._prefer_fused_optimizer()
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
        # every rank must take the same branch (the training schedule and the forward-only path exchange different
        # messages): decide from the whole model, not from this rank's parameters (a stage of parameter-free ops,
        # e.g. a loss-only last stage, still runs the schedule: it passes gradients back, and has nothing to step)
        backward = torch.is_grad_enabled() and var.trains
        m = lay.num_microbatches
        extras: dict = {}
        if backward:
            # without the fp16 scaler the 1/m of the microbatch mean is the loss scale (the same on every rank:
            # the last stage applies it), so offloaded gradients can stay in the engine's host buffers, undivided
            mean_in_loss = not self.scaler.enabled
            on_host = mean_in_loss and self._offload is not None and self._offload.keeps_grads_on_host(var)
            pipe.loss_scale = 1.0 / m if mean_in_loss else self.scaler.scale
            saved = stash_grads(var.params)
            if self._offload is not None:
                self._offload.before_run(on_host, m, tied=bool(var.shared_groups))
            try:
                loss_sum = pipe.run(inputs, train=True)
                if self._offload is not None:
                    self._offload.after_run()
            except (RuntimeError, torch.OutOfMemoryError) as e:
                err = explain_oom(self, e)
                if err is None:
                    raise
                raise err from e
            finally:
                new = restore_grads(var.params, saved)
            if self._offload is not None and not on_host:
                new = self._offload.collect(var, new)
            if not on_host:
                new = finish_new_grads(self, new, m, mean_in_loss)
            for _, idx, grp in var.shared_groups:
                if on_host:   # the engine keeps this call's gradients: only the tied ones make a round trip
                    self._offload.allreduce_tied_(var, idx, grp, new)
                    continue
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
        if self._offload is not None:
            self._offload.accumulate(payload, go, payload.synced and self._unsynced)
        pairs = [(p, g) for p, g in zip(payload.params, payload.grads) if g is not None]
        if go.numel() == 1:
            # scaled on the device: reading go (1.0 unless the loss was scaled) would wait for the whole backward
            # and leave the GPU idle while the host clips and steps (BERT-large on the H200: ~5 ms a step)
            scale_grads_([g for _, g in pairs], go.reshape(()))
        else:
            pairs = [(p, g * go.to(g.dtype)) for p, g in pairs]
        older = [(p.grad, g) for p, g in pairs if p.grad is not None]
        for p, g in pairs:
            if p.grad is None:
                p.grad = g
        add_grads_([a for a, _ in older], [g for _, g in older])
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient, the offload engine's host buffers included (the Trainer calls this, not
        ``optimizer.zero_grad()``; without it offloaded gradients would add up across steps)."""
        super().zero_grad(set_to_none=set_to_none)
        if self._offload is not None:
            self._offload.reset()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip ``.grad`` of all stages by their global norm (shared parameters counted once); returns it."""
        var = self._primary
        if var is None:
            return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm, norm_type)
        owned = [p.grad for p, n in zip(var.params, var.names) if self._owned(n)]
        extra = self._offload.grad_norm_part(var, self._owned, float(norm_type)) if self._offload is not None else None
        total = global_grad_norm(owned, self.mesh.pp_group, float(norm_type), self.device, extra=extra)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        scale_grads_([p.grad for p in var.params], coef)
        if self._offload is not None:
            self._offload.scale_grads_(coef)
        return total

