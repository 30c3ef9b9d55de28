"""Offload engine, optimizer step: over the host masters (synchronous, or per block on a worker while
the next forward runs, or for the first K blocks on the device), then the new working copies.

:class:`_StepMixin` is mixed into :class:`~rannc_hf.offload.engine.OffloadEngine` and works on the engine's state
(``self.groups``, ``self.blocks``, streams, ...); see the engine module for the whole picture::

    from rannc_hf.offload import OffloadEngine
    eng = OffloadEngine(blocks, device="cuda", mode="all", optimizer=opt)   # has every mixin's methods
"""

from __future__ import annotations

import time

import torch

from ..errors import OffloadError
from .optimizer import sync_hyperparams
from .store import ParamGroup


class _StepMixin:
    """The optimizer step of :class:`~rannc_hf.offload.engine.OffloadEngine`."""

    def step(self) -> None:
        """One optimizer step over the host masters, then new weights to the resident working copies."""
        if self.optimizer is None:
            raise OffloadError("the offload engine has no optimizer; pass optimizer= or call set_optimizer()")
        if self.async_step:
            return self._step_async()
        self.drain(force=True)
        self._materialize_scale()
        if self.cuda:
            self.h2d_stream.synchronize()
        t0 = time.perf_counter()
        last_ev = None
        for gi, g in enumerate(self.groups):
            inner = self._inner[gi]
            if inner is None:
                continue
            sync_hyperparams(self.optimizer, inner, self._inner_groups[gi])
            if self.step_on_cpu or not self.cuda:
                g.attach_host_grads()
                inner.step()
                g.detach_host_grads()
            else:
                self._device_step(g, inner)
            g.refresh_shadow()
            if g.resident:
                last_ev = self._refresh_work(g) or last_ev
        if last_ev is not None:
            torch.cuda.current_stream(self.device).wait_event(last_ev)
        self._stats["step_time_s"] += time.perf_counter() - t0
        self._stats["steps"] += 1
        self.optimizer._opt_called = True  # keeps LR schedulers' order check quiet

    def _step_async(self) -> None:
        """Step the resident group now, then each block in forward order on the worker thread.

        ``before_forward(i)`` (and any fetch of block ``i``) waits for block ``i``'s step, so the next
        forward runs while later blocks still step; reading masters or state waits for all of them.
        """
        self.drain(force=True)
        for g in self.groups:  # a step still running from before (no forward in between)
            self._wait_group_step(g)
        scale = self._scale
        self._scale = None
        bwd_done = None
        if self.cuda:
            bwd_done = torch.cuda.Event()
            bwd_done.record(torch.cuda.current_stream(self.device))
        t0 = time.perf_counter()
        order = [self.rest] + [g for g in self.blocks if not g.device_step] + [g for g in self.blocks if g.device_step]
        for g in order:
            gi = g.index
            inner = self._inner[gi]
            if inner is None:
                continue
            sync_hyperparams(self.optimizer, inner, self._inner_groups[gi])
            has = list(g.has_grad)
            if g is self.rest:
                self._step_group(g, inner, has, scale, bwd_done)
                self._wait_group_step_now(g)
            elif g.device_step:
                self._device_step_async(g, inner, has, scale, bwd_done)
            else:
                g.step_fut = self._pool().submit(self._step_group, g, inner, has, scale, bwd_done)
        self._stats["step_time_s"] += time.perf_counter() - t0  # the blocks' time is added by the worker
        self._stats["steps"] += 1
        self.optimizer._opt_called = True

    def _device_step_async(self, g: ParamGroup, inner, has: list, scale, bwd_done=None) -> None:
        """Step ``g`` on the device (state resident there): master and gradient in, new master and
        compute-dtype shadow back, working copy cast on the device; on the compute stream (or the side
        step stream, after the backward: ``step_stream``), no host wait."""
        side = self._step_stream
        if side is None:
            return self._device_step_body(g, inner, has, scale)
        if bwd_done is not None:
            side.wait_event(bwd_done)
        with torch.cuda.stream(side):
            self._device_step_body(g, inner, has, scale)

    def _device_step_body(self, g: ParamGroup, inner, has: list, scale) -> None:
        dev = self.device
        m = g.master.to(dev, non_blocking=True)
        if g.keep_grads:   # the gradients never left the device
            gr = g.dev_grad if g.dev_grad is not None else torch.zeros(g.numel, dtype=torch.float32, device=dev)
            if self._step_stream is not None:
                gr.record_stream(self._step_stream)
        else:
            gr = g.grad.to(dev, non_blocking=True)
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(m, j)
            hp.grad = g.view(gr, j) if has[j] else None
        if scale is not None:
            grads = [hp.grad for hp in g.host_params if hp.grad is not None]
            if grads:
                torch._foreach_mul_(grads, float(scale))
        inner.step()
        for j, hp in enumerate(g.host_params):
            hp.grad = None
        if self.cuda:
            g.master.copy_(m, non_blocking=True)
            if g.shadow is not g.master:
                g.shadow.copy_(m.to(g.shadow.dtype), non_blocking=True)
            if g.resident:
                g.work.copy_(m)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            g.step_event = ev
            self._stats["d2h_bytes"] += g.master.nbytes + (g.shadow.nbytes if g.shadow is not g.master else 0)
        else:
            g.refresh_shadow()
            if g.resident:
                g.work.copy_(g.shadow)
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(g.master, j)
        self._stats["h2d_bytes"] += g.master.nbytes + (0 if g.keep_grads else g.grad.nbytes)

    def _wait_group_step_now(self, g: ParamGroup) -> None:
        if self.cuda and g.step_event is not None:
            torch.cuda.current_stream(self.device).wait_event(g.step_event)
        g.step_event = None

    def _step_group(self, g: ParamGroup, inner, has: list, scale, bwd_done) -> None:
        t0 = time.perf_counter()
        for j, hp in enumerate(g.host_params):
            hp.grad = g.view(g.grad, j) if has[j] else None
        fused = scale is not None and all(gr.get("fused") for gr in inner.param_groups)
        if scale is not None and not fused:
            grads = [hp.grad for hp in g.host_params if hp.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)
        if fused:
            inner.grad_scale = (1.0 / scale).to(torch.float32)  # the kernel divides grads by it
        try:
            inner.step()
        finally:
            if fused:
                del inner.grad_scale
            for hp in g.host_params:
                hp.grad = None
        g.refresh_shadow()
        ev = None
        if g.resident:
            self._stats["h2d_bytes"] += g.work_bytes
            if self.cuda:
                s = self.h2d_stream
                with torch.cuda.stream(s):
                    if bwd_done is not None:
                        s.wait_event(bwd_done)
                    g.work.copy_(g.shadow, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(s)
            else:
                g.work.copy_(g.shadow)
        g.step_event = ev
        t1 = time.perf_counter()
        if g is not self.rest:
            self._stats["step_time_s"] += t1 - t0
        if self.timing:
            self.wlog.append(("step", g.index, t0, t0, t1))

    def _device_step(self, g: ParamGroup, inner: torch.optim.Optimizer) -> None:
        m = g.master.to(self.device, non_blocking=True)
        gr = g.grad.to(self.device, non_blocking=True)
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(m, j)
            hp.grad = g.view(gr, j) if g.has_grad[j] else None
        inner.step()
        g.master.copy_(m)
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(g.master, j)
            hp.grad = None
        self._stats["h2d_bytes"] += 2 * g.master.nbytes
        self._stats["d2h_bytes"] += g.master.nbytes

    def _refresh_work(self, g: ParamGroup):
        self._stats["h2d_bytes"] += g.work_bytes
        if not self.cuda:
            t0 = time.perf_counter()
            g.work.copy_(g.shadow)
            self._stats["copy_time_s"] += time.perf_counter() - t0
            return None
        s = self.h2d_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            g.work.copy_(g.shadow, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

