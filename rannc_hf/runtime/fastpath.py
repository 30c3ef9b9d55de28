"""The single-stage fast path of :class:`~rannc_hf.runtime.module.RanncModule`: one stage, one replica, no offload.

    cfg = rannc_hf.RanncConfig(num_stages=1, num_microbatches=2, precision="fp32")
    model = rannc_hf.RanncModule(MyModel(), optimizer, config=cfg)     # one process
    loss = model(**batch).loss       # the user's module called directly (autocast / torch.compile as configured),
    loss.backward()                  # microbatch loop with a backward each when num_microbatches > 1 or fp16

No pipeline and no stage modules are built (not with offload or recompute, which need the stage graph);
``RANNC_HF_FAST_PATH=0`` turns it off. :class:`_FastPathMixin`
holds the RanncModule methods (``_fast_eligible``, ``_build_fast``, ``_fast_forward``, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

from .carry import _CarryGrads, _Payload, finish_new_grads
from .evaluation import PipelineOutput, _float_loss, _loss_value, _merge_outputs
from .grads import restore_grads, stash_grads

log = logging.getLogger(__name__)


class _FastPathMixin:
    """RanncModule's single-stage fast path (mixed into :class:`~rannc_hf.runtime.module.RanncModule`)."""

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

    def _wants_recompute(self) -> bool:
        plan = self.layout.plan if self.layout is not None else None
        if plan is not None and plan.stages:
            return any(s.recompute != "none" for s in plan.stages)
        return self.config.recompute in ("full", "selective")

    def _fast_eligible(self) -> bool:
        """One stage, one replica, no offload, no recompute: run the user's module directly
        (``RANNC_HF_FAST_PATH=0`` disables)."""
        lay = self.layout
        return (lay.num_stages == 1 and lay.dp_size == 1 and not self._wants_offload()
                and not self._wants_recompute() and not getattr(self, "_fast_declined", False)
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
                    g = self._capture(example)
                finally:
                    self.module.train(was)
            if from_file:
                lay.plan.check_graph(g)
                self.plan = lay.plan
            else:
                self.plan = Plan.from_cuts(g, [], num_microbatches=lay.num_microbatches, dp_size=1,
                                           schedule=lay.schedule)
        if self._compiled_encoder():
            log.info("fast path declined: compiled, the model's own forward builds the all-true padding mask that "
                     "eager attention skips (fp32 math attention); the captured graph, mask dropped, is compiled instead")
            self._fast_declined = True
            return
        pf = self.config.plan_file
        if pf and not os.path.exists(pf) and dist.get_rank() == 0:
            self.plan.save(pf)
        self.module.to(self.device)       # in place: the optimizer keeps the same parameter objects
        self._fast = True
        self._fast_fn = self._maybe_compile(self.module)
        self._localize_optimizer()
        self._prefer_fused_optimizer()

    def _compiled_encoder(self) -> bool:
        """Compile is on for a model whose attention is bidirectional (an encoder). Its own forward, traced by dynamo,
        takes Hugging Face's traced-mask branch (transformers 5.17: an all-true ``[B, 1, S, S]`` mask expanded with
        stride 0), and attention with that mask ran the fp32 math kernel on the H200 (BERT-large 130 ms a step against
        109 eager, 32.9 GiB against 24.3; ``benchmarks/h200/sdpa_rannc.py``). The captured graph has such masks
        dropped (:mod:`rannc_hf.capture.constant_masks`), so compiled encoders run it rather than the fast path."""
        plan = getattr(self, "plan", None)
        return bool(getattr(plan, "bidirectional_attention", False)) and self._compiles()

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
        new = finish_new_grads(self, new, m)
        anchor = torch.empty(0, requires_grad=True)
        loss = _CarryGrads.apply(anchor, (total / m).detach(), self, _Payload(params, new, self._sync))
        return loss if is_tensor else PipelineOutput(loss=loss)
