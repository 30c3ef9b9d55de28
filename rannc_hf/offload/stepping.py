"""Offload engine, optimizer step: over the host masters (synchronous, or per block on a worker while
the next forward runs, or for the first K blocks on the device), then the new working copies.

:class:`_StepMixin` is mixed into :class:`~rannc_hf.offload.engine.OffloadEngine` and works on the engine's state
(``self.groups``, ``self.blocks``, streams, ...); see the engine module for the whole picture::

    from rannc_hf.offload import OffloadEngine
    eng = OffloadEngine(blocks, device="cuda", mode="all", optimizer=opt)   # has every mixin's methods
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from ..config import env_flag
from ..errors import OffloadError
from .flat_step import FlatStep
from .optimizer import sync_hyperparams
from .store import ParamGroup, _empty_host


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing on a CPU device (``stream`` None)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _streamable(v, hp) -> bool:
    """State a streamed step moves with its block: an fp32 tensor of the parameter's shape."""
    return torch.is_tensor(v) and v.dtype == torch.float32 and v.shape == hp.shape and v.dim() > 0


def _state_buffer(g: ParamGroup, key: str) -> torch.Tensor:
    """The flat pinned host buffer of a streamed block's state ``key`` (zeros, made on first use)."""
    host = g.sstate.get(key)
    if host is None:
        host = g.sstate[key] = _empty_host(g.numel, torch.float32, g.pin)
        host.zero_()
    return host


def _scaled_step(g: ParamGroup, inner, scale) -> None:
    """``inner.step()`` over ``g``'s host parameters as they are bound (device views in a GPU step), the clip
    coefficient ``scale`` (or None) applied to their gradients first; the gradients are unbound after."""
    if scale is not None:
        grads = [hp.grad for hp in g.host_params if hp.grad is not None]
        if grads:
            torch._foreach_mul_(grads, float(scale))
    inner.step()
    for hp in g.host_params:
        hp.grad = None


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
                self._cpu_step(g, inner, g.has_grad)
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
        if self.timing:
            t = time.perf_counter()
            self.wlog.append(("step_call", -1, t, t, t))
        self.drain(force=True)
        for g in self.groups:  # a step still running from before (no forward in between)
            if not g.early:
                self._wait_group_step(g)
        scale = self._scale
        self._scale = None
        self._inv_scale = None   # this step's 1/scale is made by its first CPU-stepped group (_step_group)
        bwd_done = None
        if self.cuda:
            bwd_done = torch.cuda.Event()
            bwd_done.record(torch.cuda.current_stream(self.device))
        t0 = time.perf_counter()
        on_gpu = [g for g in self.blocks if g.device_step or g.stream_step]   # forward order: the GPU pipe's
        on_cpu = [g for g in self.blocks if not (g.device_step or g.stream_step)]
        # the GPU pipe first (its copies and kernels are queued in microseconds), so that it runs while the worker
        # steps the rest group on the CPU; RANNC_HF_OFFLOAD_REST_FIRST=1 restores the old order to compare
        order = [self.rest] + on_cpu + on_gpu if self.rest_first else on_gpu + [self.rest] + on_cpu
        for g in order:
            gi = g.index
            inner = self._inner[gi]
            if inner is None or g.early:   # stepped during backward already (step_in_backward)
                g.early = False
                continue
            sync_hyperparams(self.optimizer, inner, self._inner_groups[gi])
            has = list(g.has_grad)
            if g is self.rest and g.device_step:
                self._gpu_rest_step(g, inner, has, scale)
            elif g is self.rest:   # on the step worker (its thread count is the engine's, the main thread's
                t_rest = time.perf_counter()   # may be 1); the next forward starts with these weights: wait
                self._pool().submit(self._step_group, g, inner, has, scale, bwd_done).result()
                self._wait_group_step_now(g)
                self._stats["rest_step_time_s"] += time.perf_counter() - t_rest
            elif g.device_step or g.stream_step:
                self._device_step_async(g, inner, has, scale, bwd_done)
            else:
                g.step_fut = self._pool().submit(self._step_group, g, inner, has, scale, bwd_done)
        self._release_ring()
        self._forget_pass()   # a backward after this one starts a new count (offload_module has no passes)
        self._stats["step_time_s"] += time.perf_counter() - t0  # the blocks' time is added by the worker
        self._stats["steps"] += 1
        self.optimizer._opt_called = True

    def _step_in_backward(self, g: ParamGroup) -> None:
        """Block ``g`` got its last gradient of the pass (``step_in_backward``): step it now, while backward goes
        on. A GPU-stepped block's gradients stayed on the device (``_on_grad``) and its step runs off the compute
        stream; a CPU-stepped block's step is queued on the worker behind its fold. An offloaded block's working
        copy is not refreshed (backward's end releases it; its next fetch waits for this step)."""
        inner = self._inner[g.index]
        if inner is None:
            return
        sync_hyperparams(self.optimizer, inner, self._inner_groups[g.index])
        if self.timing:
            t = time.perf_counter()
            self.wlog.append(("in_backward", g.index, t, t, t))
        done = _record(torch.cuda.current_stream(self.device)) if self.cuda else None   # the block's backward
        refresh = not g.offload
        if g.device_step:
            self._device_step_async(g, inner, list(g.has_grad), None, done, kept=True, refresh=refresh)
            self._give_grad_buffer(g.dev_grad, g.step_event)
            g.dev_grad = None      # consumed: like torch's optimizer-in-backward
            g.has_grad = [False] * len(g.params)
            g.arrived = set()
        else:
            if self.cuda and g.round:
                self._submit_round(g)
            has = [p.requires_grad for p in g.params]   # every one got its gradient (not g.has_grad: the fold
            g.step_fut = self._pool().submit(self._step_group, g, inner, has, None, done, refresh)   # may lag)
        g.early = True
        self._stats["early_block_steps"] += 1

    def _device_step_async(self, g: ParamGroup, inner, has: list, scale, bwd_done=None, *,
                           kept: Optional[bool] = None, refresh: bool = True) -> None:
        """Step ``g`` on the device, off the compute stream: its fp32 master (+ gradient unless kept on the
        device, + optimizer state for a streamed block) come in on the step-input stream into a slot of a
        two-slot device ring, the step and the copies back (master, compute-dtype shadow, streamed state) run
        on the step-output stream; ``g.step_event`` marks the end, which the next fetch or forward of ``g``
        waits for on the GPU (no host wait). Two slots let block ``i+1``'s inputs cross while block ``i``'s
        results go back (PCIe is full duplex). On a CPU device the same runs synchronously.

        ``kept``: the gradients are in ``g.dev_grad`` (default: ``g.keep_grads``); ``refresh``: copy the new
        weights into a resident working copy."""
        dev = self.device
        kept = g.keep_grads if kept is None else kept
        keys = self._staged_state(g) if g.stream_step else []
        n = g.numel
        slot = self._ring_slot(n * (1 + (0 if kept else 1) + len(keys)))
        sin, sout = self._step_in, self._step_out
        with _on(sin):
            if bwd_done is not None:
                sin.wait_event(bwd_done)
            if slot[1] is not None:
                sin.wait_event(slot[1])        # the slot's previous block has gone back
            buf = slot[0]
            m = buf[:n]
            m.copy_(g.master, non_blocking=True)
            off = n
            if not kept:
                gr = buf[off:off + n]
                gr.copy_(g.grad, non_blocking=True)
                off += n
            dstate = {}
            for k in keys:
                dstate[k] = buf[off:off + n]
                dstate[k].copy_(g.sstate[k], non_blocking=True)
                off += n
            ev_in = _record(sin)
        with _on(sout):
            if ev_in is not None:
                sout.wait_event(ev_in)
            if bwd_done is not None:
                sout.wait_event(bwd_done)
            if kept:   # the gradients never left the device
                gr = g.dev_grad if g.dev_grad is not None else torch.zeros(n, dtype=torch.float32, device=dev)
                if sout is not None:
                    gr.record_stream(sout)
            for j, hp in enumerate(g.host_params):
                hp.data = g.view(m, j)
                hp.grad = g.view(gr, j) if has[j] else None
                st = inner.state.get(hp)
                for k in keys:
                    if st is not None and k in st:
                        st[k] = g.view(dstate[k], j)
            _scaled_step(g, inner, scale)
            if g.stream_step:
                self._state_back(g, inner, dstate)
            g.master.copy_(m, non_blocking=True)
            # a block that stays resident gets its new weights on the device; its host shadow is only read by a
            # later refill, which then sends the fp32 master and casts it (store.fill_work): no trip back for it
            skip_shadow = self.cuda and g.resident and refresh and not g.offload
            if g.shadow is not g.master:
                if skip_shadow:
                    g.shadow_stale = True
                else:
                    g.shadow.copy_(m.to(g.shadow.dtype), non_blocking=True)
            if g.resident and refresh:
                g.work.copy_(m)
            ev = _record(sout)
        slot[1] = ev
        g.step_event = ev
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(g.master, j)
        st_bytes = sum(g.sstate[k].nbytes for k in g.sstate) if g.stream_step else 0
        self._stats["h2d_bytes"] += g.master.nbytes + (0 if kept else g.grad.nbytes) + st_bytes
        shadow_back = g.shadow.nbytes if (g.shadow is not g.master and not skip_shadow) else 0
        self._stats["d2h_bytes"] += g.master.nbytes + shadow_back + st_bytes

    def _gpu_rest_step(self, g: ParamGroup, inner, has: list, scale) -> None:
        """The rest group stepped on the device (``gpu_step_rest``): its fp32 master, optimizer state and gradients
        all live there, so the step is a few kernels on the compute stream, which the next forward needs first
        anyway; the working copy is refreshed in place and the new master goes back to the host on the step-output
        stream, for readers of the host master (``g.step_event`` marks it; the next step waits for it before
        writing the device master again). The device master is made from the host one on the first step, and
        again after :meth:`load_param_` wrote the host one."""
        if g.dev_master is None:
            g.dev_master = g.master.to(self.device, non_blocking=True, copy=True)
            self._stats["h2d_bytes"] += g.master.nbytes
        m = g.dev_master
        gr = g.dev_grad if g.dev_grad is not None else torch.zeros(g.numel, dtype=torch.float32, device=self.device)
        for j, hp in enumerate(g.host_params):
            hp.data = g.view(m, j)
            hp.grad = g.view(gr, j) if has[j] else None
        try:
            _scaled_step(g, inner, scale)
        finally:
            for j, hp in enumerate(g.host_params):
                hp.grad = None
                hp.data = g.view(g.master, j)
        g.work.copy_(m)
        if g.shadow is not g.master:
            g.shadow_stale = True   # a later refill casts the master (store.fill_work)
        sout = self._step_out
        if sout is None:
            g.master.copy_(m)
            g.step_event = None
        else:
            sout.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(sout):
                g.master.copy_(m, non_blocking=True)
            g.step_event = _record(sout)
        self._stats["d2h_bytes"] += g.master.nbytes

    def _ring_slot(self, numel: int) -> list:
        """The next ``[device buffer, event when free]`` of the two-slot ring (grown when too small; released
        at the end of the step, so it only takes memory between backward and the next forward's start)."""
        ring = self._ring
        if ring is None:
            ring = self._ring = [[None, None], [None, None]]
            self._ring_pos = 0
        slot = ring[self._ring_pos % 2]
        self._ring_pos += 1
        if slot[0] is None or slot[0].numel() < numel:
            if slot[0] is not None and slot[1] is not None:
                slot[1].synchronize()
            with _on(self._step_in):
                slot[0] = torch.empty(numel, dtype=torch.float32, device=self.device)
            if self._step_out is not None:
                slot[0].record_stream(self._step_out)
        return slot

    def _release_ring(self) -> None:
        self._ring = None   # the allocator reuses the slots once both step streams are past them
        self._grad_pool = []

    def _staged_state(self, g: ParamGroup) -> list:
        """Keys of ``g``'s streamed optimizer state (fp32 tensors shaped like their parameter), each held in one
        flat pinned host buffer ``g.sstate[key]`` whose per-parameter views the inner optimizer's state points
        at between steps. State the optimizer holds elsewhere (loaded from a checkpoint, first made by a step)
        is copied in; other state (step counts, factored moments) stays where it is."""
        inner = self._inner[g.index]
        for j, hp in enumerate(g.host_params):
            st = inner.state.get(hp) if inner is not None else None
            for k, v in (st or {}).items():
                if not _streamable(v, hp):
                    continue
                hv = g.view(_state_buffer(g, k), j)
                if v.data_ptr() != hv.data_ptr():
                    hv.copy_(v)
                    st[k] = hv
        return list(g.sstate)

    def _state_back(self, g: ParamGroup, inner, dstate: dict) -> None:
        """After a streamed step (on the output stream): the state back to its host buffers, the inner
        optimizer's state pointed at them again (state this step made is given a host buffer too)."""
        for k, d in dstate.items():
            g.sstate[k].copy_(d, non_blocking=True)
        for j, hp in enumerate(g.host_params):
            st = inner.state.get(hp)
            for k, v in (st or {}).items():
                if k in dstate and v.data_ptr() == g.view(dstate[k], j).data_ptr():
                    st[k] = g.view(g.sstate[k], j)
                elif _streamable(v, hp) and v.device != g.master.device:   # made by this (first) step
                    hv = g.view(_state_buffer(g, k), j)
                    hv.copy_(v, non_blocking=True)
                    st[k] = hv

    def _wait_group_step_now(self, g: ParamGroup) -> None:
        if self.cuda and g.step_event is not None:
            torch.cuda.current_stream(self.device).wait_event(g.step_event)
        g.step_event = None

    def _step_group(self, g: ParamGroup, inner, has: list, scale, bwd_done, refresh: bool = True) -> None:
        """Step ``g`` over its host masters on the step worker (``step()`` waits for the rest group's); ``has``:
        which parameters have a gradient; ``refresh``: fill a resident working copy with the new weights."""
        t0 = time.perf_counter()
        fused = scale is not None and all(gr.get("fused") for gr in inner.param_groups)
        if fused:   # the kernel divides grads by it; made once per step, not per block (each call waits for the GIL)
            cached = self._inv_scale
            if cached is None or cached[0] is not scale:
                cached = self._inv_scale = (scale, (1.0 / scale).to(torch.float32))
            inner.grad_scale = cached[1]
        try:
            # the flat step reads the flat gradient buffer: no per-parameter views to make (each a torch call,
            # which from this worker thread waits for the GIL again while the main thread runs Python)
            if not self._flat_step(g, inner, has):
                for j, hp in enumerate(g.host_params):
                    hp.grad = g.view(g.grad, j) if has[j] else None
                if scale is not None and not fused:
                    grads = [hp.grad for hp in g.host_params if hp.grad is not None]
                    if grads:
                        torch._foreach_mul_(grads, scale)
                inner.step()
        finally:
            if fused:
                del inner.grad_scale
            for hp in g.host_params:
                hp.grad = None
        g.mark_shadow_stale()
        ev = None
        t_fill = time.perf_counter()
        if g.resident and refresh:
            if self.cuda:
                s = self.h2d_stream
                with torch.cuda.stream(s):
                    if bwd_done is not None:
                        s.wait_event(bwd_done)
                    self._stats["h2d_bytes"] += g.fill_work(non_blocking=True)[0]
                    ev = torch.cuda.Event()
                    ev.record(s)
            else:
                self._stats["h2d_bytes"] += g.fill_work()[0]
        g.step_event = ev
        t1 = time.perf_counter()
        if g is not self.rest:   # the rest group's time is inside step()'s own
            self._stats["step_time_s"] += t1 - t0
            self._stats["cpu_block_step_time_s"] += t1 - t0
            self._stats["cpu_block_refill_time_s"] += t1 - t_fill   # a resident block's new weights to the GPU
            self._stats["cpu_block_steps"] += 1
        self._note_worker_task(t0, t1)
        if self.timing:
            self.wlog.append(("step", g.index, t0, t0, t1))

    def _cpu_step(self, g: ParamGroup, inner, has: list) -> None:
        """``inner.step()`` over ``g``'s host masters (gradients bound), as one flat tensor per param group where
        it applies (:mod:`~rannc_hf.offload.flat_step`; ``RANNC_HF_OFFLOAD_FLAT_STEP=0`` turns it off)."""
        if not self._flat_step(g, inner, has):
            inner.step()

    def _flat_step(self, g: ParamGroup, inner, has: list) -> bool:
        """Step ``g`` flat if a :class:`FlatStep` applies this time (made at the block's first CPU step);
        returns whether it did."""
        flat = self._flat.get(g.index, False)
        if flat is False:
            flat = self._flat[g.index] = (FlatStep.build(g, inner) if env_flag("RANNC_HF_OFFLOAD_FLAT_STEP") is not False
                                          else None)
        return flat is not None and flat.step(has)

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
        if not self.cuda:
            t0 = time.perf_counter()
            self._stats["h2d_bytes"] += g.fill_work()[0]
            self._stats["copy_time_s"] += time.perf_counter() - t0
            return None
        s = self.h2d_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._stats["h2d_bytes"] += g.fill_work(non_blocking=True)[0]
            ev = torch.cuda.Event()
            ev.record(s)
        return ev

