"""Step a block's Adam / AdamW on the CPU as one flat tensor per param group instead of one tensor per parameter.

A block's fp32 masters and gradients already live in one flat host buffer each (:class:`~.store.ParamGroup`), with
zero padding between parameters. torch's fused CPU AdamW over BERT-large's 16 tensors of a layer (12.6M
parameters) ran at 2.3e9 parameters/s on the H200's host next to a busy main thread, and at 6.8e9 as one flat
tensor (``benchmarks/h200/adam_shapes.py``); on 2 cores here 2.4e9 and 4.5e9 alone. The element-wise update is the
same either way, and the padding stays zero (zero gradient, zero state, zero weight).

The per-parameter optimizer (``inner``) stays the owner of the state: its ``exp_avg`` / ``exp_avg_sq`` become views
of the flat buffers, so ``state_dict`` / ``load_state_dict`` and a per-parameter fallback step see the same
numbers. A step runs flat when each inner param group's parameters are consecutive in the block, every one of
them has a gradient and all share one step count; otherwise it runs per parameter. The engine lays each block out
in the optimizer's order when it is built with the optimizer, so interleaved groups (weight decay on matrices,
none on biases and norms) are consecutive; an optimizer given later (``set_optimizer``) keeps the module order::

    >>> import torch
    >>> from rannc_hf.offload.store import ParamGroup
    >>> g = ParamGroup(0, [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(5))], "cpu",
    ...                torch.float32, offload=False)
    >>> inner = torch.optim.AdamW(g.host_params, lr=0.1, fused=True)
    >>> flat = FlatStep.build(g, inner)
    >>> _ = g.grad.fill_(1.0)
    >>> flat.step([True, True])
    True
    >>> round(g.host_params[1][0].item(), 4), inner.state[g.host_params[0]]["step"].item()
    (0.899, 1.0)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .store import ParamGroup

_KINDS = ("Adam", "AdamW")
_OWN = {"params"}


class FlatStep:
    """The flat view of one block's per-parameter Adam/AdamW (see the module docstring); ``build`` says whether one
    applies."""

    def __init__(self, g: ParamGroup, inner: torch.optim.Optimizer, runs: list[tuple[list[int], int, int]]):
        self.g = g
        self.inner = inner
        self.runs = runs   # per inner param group: (parameter indices j, flat start, flat end)
        self.keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if any(gr.get("amsgrad") for gr in inner.param_groups)
                                                 else [])
        self.buffers = [{k: torch.zeros(b - a, dtype=torch.float32) for k in self.keys} for _, a, b in runs]
        self.flat_params = [nn.Parameter(g.master[a:b]) for _, a, b in runs]
        groups = [{**{k: v for k, v in ig.items() if k not in _OWN}, "params": [fp]}
                  for ig, fp in zip(inner.param_groups, self.flat_params)]
        self.opt = type(inner)(groups, fused=True)
        self.steps = 0   # flat steps taken

    @classmethod
    def build(cls, g: ParamGroup, inner: Optional[torch.optim.Optimizer]) -> Optional["FlatStep"]:
        """A :class:`FlatStep` for ``g`` when ``inner`` is a fused CPU Adam/AdamW whose every param group is a run
        of consecutive parameters of ``g``; else None (the block steps per parameter)."""
        if inner is None or type(inner).__name__ not in _KINDS or not type(inner).__module__.startswith("torch.optim"):
            return None
        if g.master.device.type != "cpu" or not all(gr.get("fused") for gr in inner.param_groups):
            return None
        if any(gr.get("differentiable") or gr.get("capturable") for gr in inner.param_groups):
            return None
        index = {id(hp): j for j, hp in enumerate(g.host_params)}
        runs = []
        for ig in inner.param_groups:
            js = [index.get(id(hp)) for hp in ig["params"]]
            if not js or None in js or js != list(range(js[0], js[0] + len(js))):
                return None
            last = js[-1]
            runs.append((js, g.offsets[js[0]], g.offsets[last] + g.numels[last]))
        return cls(g, inner, runs)

    def _common_step(self) -> Optional[float]:
        """The step count every parameter shares (0.0 with no state yet), or None if they differ; moves any state
        that is not a view of the flat buffers (after ``load_state_dict``) into them."""
        count = None
        for (js, a, _), bufs in zip(self.runs, self.buffers):
            for j in js:
                hp = self.g.host_params[j]
                st = self.inner.state.get(hp)
                c = float(st["step"]) if st else 0.0
                if count is None:
                    count = c
                elif c != count:
                    return None
                if st:
                    o = self.g.offsets[j] - a
                    for k in self.keys:
                        if k not in st:
                            return None
                        view = bufs[k][o:o + hp.numel()].view(hp.shape)
                        if st[k].data_ptr() != view.data_ptr():
                            view.copy_(st[k])
                            st[k] = view
        return count

    def step(self, has: list[bool]) -> bool:
        """Step flat if it applies this time (every parameter has a gradient, one step count); returns whether
        it did. The caller has bound any ``grad_scale`` on ``inner``: it is passed on."""
        if not all(has[j] for js, _, _ in self.runs for j in js):
            return False
        if self.flat_params[0].data_ptr() != self.g.master[self.runs[0][1]:].data_ptr():   # masters moved
            for fp, (_, a, b) in zip(self.flat_params, self.runs):
                fp.data = self.g.master[a:b]
        count = self._common_step()
        if count is None:
            return False
        for ig, fg in zip(self.inner.param_groups, self.opt.param_groups):
            for k, v in ig.items():
                if k not in _OWN:
                    fg[k] = v
        for fp, (_, a, b), bufs in zip(self.flat_params, self.runs, self.buffers):
            fp.grad = self.g.grad[a:b]
            self.opt.state[fp] = {"step": torch.tensor(count, dtype=torch.float32), **bufs}
        scale = getattr(self.inner, "grad_scale", None)
        if scale is not None:
            self.opt.grad_scale = scale
        try:
            self.opt.step()
        finally:
            if scale is not None:
                del self.opt.grad_scale
            for fp in self.flat_params:
                fp.grad = None
        new = float(self.opt.state[self.flat_params[0]]["step"])
        for (js, a, _), bufs in zip(self.runs, self.buffers):
            for j in js:
                hp = self.g.host_params[j]
                st = self.inner.state.get(hp)
                if st and torch.is_tensor(st["step"]):
                    st["step"].fill_(new)
                elif st:
                    st["step"] = torch.tensor(new, dtype=torch.float32)
                else:
                    o = self.g.offsets[j] - a
                    self.inner.state[hp] = {"step": torch.tensor(new, dtype=torch.float32),
                                            **{k: bufs[k][o:o + hp.numel()].view(hp.shape) for k in self.keys}}
        self.steps += 1
        return True
