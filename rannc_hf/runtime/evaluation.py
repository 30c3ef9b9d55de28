"""The forward-only path of :class:`~rannc_hf.runtime.module.RanncModule`: outputs, logits, ``eval_forward``.

    model = rannc_hf.RanncModule(hf_model, optimizer, config=cfg)
    with torch.no_grad():
        out = model(**batch)                 # PipelineOutput(loss, logits, outputs): the last stage's outputs,
        out.loss, out.logits                 # broadcast over the pipeline (gathered over replicas)
    res = model.eval_forward(**batch)        # EvalOutput: {"loss": ..., "logits": ...}, this replica's whole batch
    res.logits.argmax(-1)

:class:`_EvalMixin` holds the RanncModule methods (``_share_outputs``, ``eval_forward``); the output types and
the helpers that read a model output (``_loss_value``, ``_float_loss``, ``_merge_outputs``) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .building import _Variant


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


class EvalOutput(dict):
    """What :meth:`RanncModule.eval_forward` returns: a dict (``loss``, ``logits``, ...) with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class _EvalMixin:
    """RanncModule's forward-only methods (mixed into :class:`~rannc_hf.runtime.module.RanncModule`)."""

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
