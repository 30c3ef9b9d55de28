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
none on biases and norms) are consecutive; an optimizer given later (``set_optimizer``) keeps the module order.

The step runs on the engine's worker thread beside a main thread that runs Python, and each torch call it makes
waits to take the GIL back (up to the 5 ms switch interval): after its first step a block calls torch's fused
kernel directly, once per param group, after numpy advanced the step counts in place (the flat runs' and each
parameter's, 0-dim views of one buffer), with the per-parameter state checked by identity only (``_in_step``). A
GPT-style layer (12.6M parameters, 2 cores) beside a Python-busy thread: 81.6 -> 27.5 ms a step
(``benchmarks/host_step_gil.py``)::

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

import numpy as np
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
        # what the per-parameter state points at while it is in step with the flat buffers: the moments as views
        # of them, and one step-count tensor per parameter that the step itself advances (see _in_step)
        self.views = {j: {k: bufs[k][g.offsets[j] - a:g.offsets[j] - a + g.numels[j]].view(g.host_params[j].shape)
                          for k in self.keys}
                      for (js, a, _), bufs in zip(runs, self.buffers) for j in js}
        # all step counts (the flat runs' first, then each parameter's) are 0-dim views of one buffer that numpy
        # advances in place: numpy keeps the GIL, where a torch call from the worker would wait to take it back
        order = [j for js, _, _ in runs for j in js]
        self._counts = np.zeros(len(runs) + len(order), dtype=np.float32)
        counts = torch.from_numpy(self._counts)
        self.flat_steps = [counts[r] for r in range(len(runs))]
        self.step_of = {j: counts[len(runs) + i] for i, j in enumerate(order)}
        self.kernel = torch._fused_adamw_ if self._decoupled(inner) else torch._fused_adam_
        self._synced = False   # the last step of this block was a flat one (a per-parameter step moves the counts)
        self._bound: tuple = ()   # (master, gradient) buffer addresses that flat_params and grads view
        self.grads: list = []

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

    @staticmethod
    def _decoupled(inner) -> bool:
        """AdamW's decoupled weight decay (``torch._fused_adamw_``) or Adam's L2 term (``torch._fused_adam_``)."""
        return bool(inner.param_groups[0].get("decoupled_weight_decay", type(inner).__name__ == "AdamW"))

    def _in_step(self) -> bool:
        """Whether every parameter's state is the one the last flat step left: its moments the cached views and
        its step count this FlatStep's own tensor. Identity checks only: the step then makes no call per
        parameter (each torch call from the step worker hands the GIL back and waits to take it again, up to the
        interpreter's 5 ms switch interval while the main thread runs Python)."""
        if not self._synced:
            return False
        state = self.inner.state
        for j, views in self.views.items():
            st = state.get(self.g.host_params[j])
            if st is None or st.get("step") is not self.step_of[j]:
                return False
            for k, v in views.items():
                if st.get(k) is not v:
                    return False
        return True

    def _adopt(self, count: float) -> None:
        """Point every parameter's state at the cached views and step tensors, all at ``count`` (after
        :meth:`_common_step` moved the numbers into the flat buffers)."""
        self._counts[:] = count
        for j, views in self.views.items():
            st = self.inner.state.setdefault(self.g.host_params[j], {})
            st["step"] = self.step_of[j]
            st.update(views)

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
        in_step = self._in_step()
        self._synced = False   # until this flat step is done: otherwise the caller steps per parameter
        if not all(has[j] for js, _, _ in self.runs for j in js):
            return False
        bound = (self.g.master.data_ptr(), self.g.grad.data_ptr())
        if bound != self._bound:   # the block's buffers moved (or first step): views of the new ones
            for fp, (_, a, b) in zip(self.flat_params, self.runs):
                fp.data = self.g.master[a:b]
            self.grads = [self.g.grad[a:b] for _, a, b in self.runs]
            self._bound = bound
        if not in_step:
            count = self._common_step()
            if count is None:
                return False
            self._adopt(count)
        if self._direct():
            self._step_direct()
        else:
            self._step_through_optimizer(float(self._counts[0]))
        self.steps += 1
        self._synced = True
        return True

    def _direct(self) -> bool:
        """The kernel can be called as torch's fused Adam/AdamW calls it on the CPU (plain float hyperparameters,
        or a CPU learning-rate tensor)."""
        for ig in self.inner.param_groups:
            lr = ig["lr"]
            if torch.is_tensor(lr) and lr.device.type != "cpu":
                return False
            if any(torch.is_tensor(b) for b in ig["betas"]):
                return False
        return True

    def _step_direct(self) -> None:
        """One flat step as torch's ``_fused_adam`` runs it on the CPU: the step counts advanced (the flat runs'
        and every parameter's, in one call), then the fused kernel once per param group."""
        scale = getattr(self.inner, "grad_scale", None)
        self._counts += 1
        for r, (ig, fp, grad, bufs) in enumerate(zip(self.inner.param_groups, self.flat_params, self.grads,
                                                      self.buffers)):
            beta1, beta2 = ig["betas"]
            self.kernel([fp], [grad], [bufs["exp_avg"]], [bufs["exp_avg_sq"]],
                        [bufs["max_exp_avg_sq"]] if ig.get("amsgrad") else [], [self.flat_steps[r]],
                        amsgrad=bool(ig.get("amsgrad")), lr=ig["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=ig["weight_decay"], eps=ig["eps"], maximize=bool(ig.get("maximize")),
                        grad_scale=scale, found_inf=None)

    def _step_through_optimizer(self, count: float) -> None:
        """The flat step through torch's own optimizer (hyperparameters the direct call does not take)."""
        for ig, fg in zip(self.inner.param_groups, self.opt.param_groups):
            for k, v in ig.items():
                if k not in _OWN:
                    fg[k] = v
        for fp, grad, bufs in zip(self.flat_params, self.grads, self.buffers):
            fp.grad = grad
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
        self._counts += 1
