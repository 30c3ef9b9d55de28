"""Offload engine, gradients: each gradient goes to the host as it is produced (on CUDA, a block's gradients
are queued and sent together when its last one arrives, then folded on a worker thread while backward goes on);
norms, scaling and clipping.

:class:`_GradientMixin` is mixed into :class:`~rannc_hf.offload.engine.OffloadEngine` and works on the engine's state
(``self.groups``, ``self.blocks``, streams, ...); see the engine module for the whole picture::

    from rannc_hf.offload import OffloadEngine
    eng = OffloadEngine(blocks, device="cuda", mode="all", optimizer=opt)   # has every mixin's methods
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch
import torch.nn as nn

from ..errors import OffloadError
from . import switch_interval
from .store import ParamGroup, copy_cast_

#: gradients queued for one copy-stream switch (``_flush_pending``) are issued early past this many bytes, so a
#: block whose gradients arrive far apart (embeddings and head in the rest group) holds little GPU memory
PENDING_BYTES = 64 << 20

#: elements per chunk of a later micro-batch's fold (fp32 buffer += compute-dtype staging, one foreach call). The
#: old Python loop over 1M-element chunks made 4 torch calls a chunk, each waiting to take the GIL back from a
#: thread running Python: a 12.6M-parameter block's fold took 8.3 ms alone and 167 ms beside a Python-busy thread
#: on 2 cores, one foreach call 5.8-9.7 and 22.5 ms (same sums, bit for bit)
FOLD_CHUNK = 1 << 22


def set_thread_torch_threads(n: int) -> None:
    """Give the calling thread ``n`` intra-op threads for good (a worker pool's initializer).

    ``torch.set_num_threads`` alone does not hold: a thread's first parallel op initialises its count from the
    value any thread set last, so a DataLoader's pin-memory thread (which sets 1) or another pool's initializer
    running in between left the offload step worker on one core (the GPT-2 1.3B recipe's CPU-stepped blocks ran
    at 0.7e9 parameters/s, 75 ms a block, with the GPU idle). Reading the count first does that initialisation
    now, so the count set after it stays."""
    torch.get_num_threads()
    torch.set_num_threads(n)


class _GradientMixin:
    """Gradient streaming, norms and clipping of :class:`~rannc_hf.offload.engine.OffloadEngine`."""

    # -- micro-batches of one pass (the pipeline runtime): sum on the device, one trip to the host ------
    def begin_pass(self, num_microbatches: int, step_in_backward: Optional[bool] = None) -> None:
        """A pipeline pass of ``num_microbatches`` backward passes starts. With :attr:`device_accumulate`
        (CUDA), each parameter's gradients of the first ``m - 1`` micro-batches are summed in an fp32 device
        buffer and only the sum leaves with the last: one copy to the host per pass and no host folds
        (GPT-2 1.3B, 4 micro-batches: the host folds took 1.0 s of a step). :meth:`end_pass` sends what
        is left (a parameter some micro-batch did not use).

        ``step_in_backward``: this pass ends with an optimizer step, so each block may step as soon as its
        last gradient of the pass arrives (default: the engine's :attr:`step_in_backward`); the runtime passes
        False when something still has to touch the gradients (all-reduce, earlier calls' gradients)."""
        early = [g for g in self.groups if g.early]
        if early:
            raise OffloadError(
                f"step_in_backward: the last backward already stepped {len(early)} offloaded block(s), but "
                f"optimizer.step() was not called after it; call optimizer.step() after every training call "
                f"(run evaluation under torch.no_grad()), or set step_in_backward=False")
        self._pass_mb = max(1, int(num_microbatches))
        want = self.step_in_backward if step_in_backward is None else bool(step_in_backward)
        self._early = want and self.async_step and (self._pass_mb == 1 or self.device_accumulate)
        self._forget_pass()

    def _forget_pass(self) -> None:
        for g in self.groups:
            g.arrivals = [0] * len(g.params)
            g.dev_acc = None
            g.pass_seen = [0] * len(g.params)
            g.pass_final = 0

    def end_pass(self) -> None:
        """Send the device sums of parameters that got fewer gradients than the pass had micro-batches."""
        for g in self.groups:
            if g.dev_acc is not None:
                for j, n in enumerate(g.arrivals):
                    if 0 < n < self._pass_mb:
                        self._send(g, j, g.view(g.dev_acc, j).to(g.params[j].dtype))
        self._forget_pass()
        self._pass_mb = 1
        self._early = self.step_in_backward

    def _accumulated(self, g: ParamGroup, j: int, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """None while parameter ``j`` of ``g`` waits for later micro-batches (``grad`` added to its device
        sum), else the gradient to send: ``grad`` itself, or the pass's sum in ``grad``'s dtype."""
        m = self._pass_mb
        if m <= 1 or not self.device_accumulate:
            return grad
        n = g.arrivals[j] = g.arrivals[j] + 1
        if g.dev_acc is None:
            g.dev_acc = torch.empty(g.numel, dtype=torch.float32, device=self.device)
        acc = g.view(g.dev_acc, j)
        if n == 1:
            acc.copy_(grad)
        else:
            acc.add_(grad)
        return acc.to(grad.dtype) if n >= m else None

    def _on_grad(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        p.grad = None
        g, j = self._where[id(p)]
        early = self._early and g is not self.rest and not g.stream_step
        if early and g.early:
            raise OffloadError(
                f"step_in_backward: block {g.index} got a gradient after it already stepped in this step's backward; "
                f"call optimizer.step() after every backward (accumulate with num_microbatches), or set "
                f"step_in_backward=False")
        if g.keep_grads or (early and g.device_step):   # stepped in backward: the gradient need not leave
            self._keep(g, j, grad)
        else:
            grad = self._accumulated(g, j, grad)
            if grad is not None:
                self._send(g, j, grad)
        if early:
            n = g.pass_seen[j] = g.pass_seen[j] + 1
            if n == self._pass_mb:
                g.pass_final += 1
                if g.pass_final == g.n_req:
                    self._step_in_backward(g)

    def _keep(self, g: ParamGroup, j: int, grad: torch.Tensor) -> None:
        """A GPU-stepped block's gradient stays on the device (``device_grads``, or a step in backward): summed
        into its fp32 buffer, which the step reads in place; nothing crosses PCIe."""
        self._got_grads = True
        self._stats["kept_grad_bytes"] += grad.numel() * grad.element_size()
        if g.dev_grad is None:
            if g.keep_grads:
                g.dev_grad = torch.zeros(g.numel, dtype=torch.float32, device=self.device)
            else:   # stepped in backward: a buffer another block's finished step gave back (has_grad guards reads)
                g.dev_grad = self._take_grad_buffer(g.numel)
        v = g.view(g.dev_grad, j)
        if g.has_grad[j]:
            v.add_(grad)
        else:
            v.copy_(grad)
        g.has_grad[j] = True
        g.gnorm = None

    def _take_grad_buffer(self, numel: int) -> torch.Tensor:
        """An fp32 device buffer of ``numel`` for a block stepped in backward: one whose last step is done (the pool
        is refilled by :meth:`_give_grad_buffer` and emptied at the end of ``step()``), else a new one. Reusing them
        keeps the caching allocator from churning 300 MB blocks near a memory cap."""
        pool = self._grad_pool
        for i, (buf, ev) in enumerate(pool):
            if buf.numel() >= numel and (ev is None or ev.query()):
                del pool[i]
                return buf[:numel]
        return torch.empty(numel, dtype=torch.float32, device=self.device)

    def _give_grad_buffer(self, buf: torch.Tensor, ev) -> None:
        base = buf._base if buf._base is not None else buf
        self._grad_pool.append((base, ev))

    def _grad_view(self, g: ParamGroup, j: int) -> torch.Tensor:
        """Parameter ``j``'s gradient buffer: on the device for a block that keeps its gradients there."""
        if g.keep_grads:
            if g.dev_grad is None:
                g.dev_grad = torch.zeros(g.numel, dtype=torch.float32, device=self.device)
            return g.view(g.dev_grad, j)
        return g.view(g.grad, j)

    def _send(self, g: ParamGroup, j: int, grad: torch.Tensor) -> None:
        """Take one gradient of parameter ``j`` of ``g`` to its host buffer (summed with earlier ones)."""
        self._got_grads = True
        self._stats["d2h_bytes"] += grad.numel() * grad.element_size()
        if not self.cuda:
            g.gnorm = None
            t0 = time.perf_counter()
            g.accumulate_grad(j, grad)
            self._stats["grad_reduce_time_s"] += time.perf_counter() - t0
        elif self.async_step:
            if j in g.round_set:  # a parameter came twice before its block completed: fold what arrived
                self._submit_round(g)
            if not g.round:  # staging is about to be overwritten: its previous fold must be done
                if g.fold_fut is not None:
                    g.fold_fut.result()
                    g.fold_fut = None
            first = j not in g.arrived   # first arrival since zero_grad: the host grad will be this one
            g.arrived.add(j)
            if first:   # upcast on the GPU, straight into the fp32 host buffer: no fold on the host
                self._stats["d2h_bytes"] += grad.numel() * (4 - grad.element_size())
                g.round_direct.add(j)
            else:
                g.dev_norms_ok = False
            g.pending.append((j, grad, first))
            g.pending_bytes += grad.numel() * grad.element_size()
            g.round.append(j)
            g.round_set.add(j)
            if len(g.round) == g.n_req:
                self._submit_round(g)
            elif g.pending_bytes >= PENDING_BYTES:
                self._flush_pending(g)
        else:
            key = (g.index, j)
            if key in self._pending:  # staging slot still busy from an earlier micro-batch
                self._finish(key, self._pending.pop(key))
            s = self.d2h_stream
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                e0 = None
                if self.timing:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e0.record(s)
                g.view(g.staging, j).copy_(grad, non_blocking=True)
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record(s)
                if self.timing:
                    self._copy_events.append((e0, ev))
            grad.record_stream(s)
            self._pending[key] = (g, j, ev)

    def _pool(self):
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            n = self.cpu_threads or torch.get_num_threads()  # a new thread would not inherit set_num_threads
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rannc-offload",
                                              initializer=set_thread_torch_threads, initargs=(n,))
            self._switch_share = switch_interval.shorten()   # the worker's GIL waits (switch_interval.py)
        return self._worker

    def _flush_pending(self, g: ParamGroup) -> None:
        """Issue the copies to the host of the gradients ``_send`` queued for ``g``: their norms in one foreach
        kernel on the compute stream, then one switch to the copy stream for all of them. Before, each gradient
        had its own norm kernel, stream wait and stream switch, and its whole hook took about 290 us of the backward
        thread (BERT-large's 390 gradients a step, profiled: benchmarks/h200/next51.sh)."""
        pend = g.pending
        if not pend:
            return
        g.pending, g.pending_bytes = [], 0
        firsts = [grad for _, grad, first in pend if first]
        if firsts:
            g.dev_norms.extend(torch._foreach_norm(firsts, 2, dtype=torch.float32))
        s = self.d2h_stream
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            if self.timing and g.round_start_event is None:
                g.round_start_event = torch.cuda.Event(enable_timing=True)
                g.round_start_event.record(s)
            for j, grad, first in pend:
                if first:
                    copy_cast_(g.view(g.grad, j), grad, non_blocking=True)
                else:
                    g.view(g.staging, j).copy_(grad, non_blocking=True)
        for _, grad, _ in pend:
            grad.record_stream(s)

    def _submit_round(self, g: ParamGroup) -> None:
        """Hand the gradients of ``g`` copied since its last fold to the worker (one event, one fold)."""
        self._flush_pending(g)
        js, direct = g.round, g.round_direct
        g.round, g.round_set, g.round_direct = [], set(), set()
        if not js:
            return
        s = self.d2h_stream
        dn = None
        if g.dev_norms_ok and len(g.dev_norms) == len(js):
            dn = torch.linalg.vector_norm(torch.stack(g.dev_norms), 2)  # on the compute stream
        g.dev_norms, g.dev_norms_ok = [], True
        ev = torch.cuda.Event(enable_timing=self.timing)
        ev.record(s)
        if self.timing and g.round_start_event is not None:  # a block's D2H copies, timed as one
            self._copy_events.append((g.round_start_event, ev))
            g.round_start_event = None
        fut = self._pool().submit(self._fold_task, g, js, ev, dn, direct)
        g.fold_fut = fut
        self._fold_futs.append((g, fut))

    def _fold_task(self, g: ParamGroup, js: list[int], ev, dev_norm=None, direct: frozenset = frozenset()) -> None:
        """Fold one block's staged gradients into its fp32 buffer once their copies landed. First arrivals
        (``direct``) were upcast on the GPU and copied straight into it: nothing to do but record them (the
        block's norm is ``dev_norm``, taken on the GPU from the same values); later ones are added in one foreach
        call over 4M-element chunks (one mixed-dtype ``add_`` over the block ran 2x slower on the CPU, and a Python
        loop over chunks makes calls that each wait for the GIL: see ``FOLD_CHUNK``)."""
        tw = time.perf_counter()
        ev.synchronize()
        t0 = time.perf_counter()
        n = len(g.params)
        if len(js) == n and all(j in direct for j in js):
            g.has_grad = [True] * n
            g.gnorm = dev_norm
        elif len(js) == n and all(g.has_grad) and not direct:   # a later micro-batch: one flat add
            torch._foreach_add_(g.grad.split(FOLD_CHUNK), g.staging.split(FOLD_CHUNK))
            g.gnorm = None
        else:
            for j in js:
                if j in direct:
                    g.has_grad[j] = True
                else:
                    g.accumulate_grad(j, g.view(g.staging, j))
            g.gnorm = None
        t1 = time.perf_counter()
        self._stats["grad_reduce_time_s"] += t1 - t0
        self._note_worker_task(tw, t1)
        if self.timing:
            self.wlog.append(("fold", g.index, tw, t0, t1))

    def _note_worker_task(self, t0: float, t1: float) -> None:
        """Count a step-worker task that ran from ``t0`` to ``t1`` (perf_counter): its time, the thread that ran it,
        and any overlap with tasks that finished before it, which one worker thread cannot have (a check on the
        counters themselves: the GPT recipe's loop once reported more worker time than wall time, because its
        summary was taken after an evaluation that lengthened the last step's block steps)."""
        self._worker_idents.add(threading.get_ident())
        if t0 < self._last_task_end:
            self._stats["worker_overlap_s"] += min(t1, self._last_task_end) - t0
        self._last_task_end = max(self._last_task_end, t1)
        self._stats["worker_task_time_s"] += t1 - t0

    def _host_norms(self, groups: list) -> None:
        """Per-group gradient norms of host fp32 buffers, chunks spread over single-threaded workers
        (a CPU norm runs at about one core's memory bandwidth however many threads torch has)."""
        pieces = []
        for g in groups:
            for j in range(len(g.params)):
                if g.has_grad[j]:
                    v = g.view(g.grad, j).reshape(-1)
                    for o in range(0, v.numel(), 1 << 22):
                        pieces.append((g, v[o:o + (1 << 22)]))
        if self._norm_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            n = self.cpu_threads or torch.get_num_threads()
            self._norm_pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rannc-norm",
                                                 initializer=set_thread_torch_threads, initargs=(1,))
        res = list(self._norm_pool.map(lambda gv: torch.linalg.vector_norm(gv[1], 2), pieces))
        by: dict[int, list] = {}
        for (g, _), r in zip(pieces, res):
            by.setdefault(id(g), []).append(r)
        for g in groups:
            rs = by.get(id(g))
            g.gnorm = torch.linalg.vector_norm(torch.stack(rs), 2) if rs else torch.zeros(())

    def _wait_folds(self) -> None:
        for g in self.groups:
            if g.round:
                self._submit_round(g)
        futs, self._fold_futs = self._fold_futs, []
        for g, f in futs:
            if not g.early:   # an early block's step follows on the worker: waiting would wait for steps before it
                f.result()

    def _wait_group_step(self, g: ParamGroup, host: bool = False) -> None:
        """Block until the background step of ``g`` is done and make the compute stream (and the fetch
        stream) wait for its copies; ``host``: also wait until the host buffers hold the new values."""
        fut = g.step_fut
        if fut is not None:
            fut.result()
            g.step_fut = None
        ev = g.step_event
        if self.cuda and ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self.h2d_stream.wait_event(ev)
            if host:
                ev.synchronize()
        g.step_event = None

    def synchronize(self) -> None:
        """Wait for everything the background worker has in hand (folds and steps)."""
        if self.async_step:
            self._wait_folds()
            for g in self.groups:
                self._wait_group_step(g, host=True)

    def _materialize_scale(self) -> None:
        if self._scale is not None:
            coef, self._scale = self._scale, None
            grads = [self._grad_view(g, j) for g, j in self._order if g.has_grad[j]]
            if grads:
                torch._foreach_mul_(grads, coef)
            for g in self.groups:
                g.gnorm = None

    def _finish(self, key, item) -> None:
        g, j, ev = item
        ev.synchronize()
        t0 = time.perf_counter()
        g.accumulate_grad(j, g.view(g.staging, j))
        self._stats["grad_reduce_time_s"] += time.perf_counter() - t0

    def drain(self, force: bool = True) -> None:
        """Fold gradients that reached the host into the fp32 accumulators (all of them if ``force``)."""
        if self.async_step:
            if force:
                self._wait_folds()
            return
        for key in list(self._pending):
            item = self._pending[key]
            if not force and not item[2].query():
                break  # the D2H stream is in order: later copies are not done either
            self._finish(key, self._pending.pop(key))

    def zero_grad(self) -> None:
        """Forget accumulated gradients (the host buffers are overwritten by the next ones)."""
        self.drain(force=True)
        for g in self.groups:   # steps in backward still reading their gradients on the worker
            if g.early and g.step_fut is not None:
                g.step_fut.result()
        self._forget_pass()
        self._scale = None
        self._got_grads = False
        for g in self.groups:
            g.has_grad = [False] * len(g.params)
            g.arrived = set()
            g.gnorm = None
            g.dev_grad = None
            g.dev_norms, g.dev_norms_ok = [], True
            for p in g.params:
                p.grad = None

    def stepped_in_backward(self) -> int:
        """Blocks that stepped during the last backward (``step_in_backward``) and wait for ``step()`` to finish."""
        return sum(g.early for g in self.groups)

    def _refuse_if_stepped(self, what: str) -> None:
        """Gradients a step in backward consumed cannot be clipped, scaled or read before ``step()``."""
        n = self.stepped_in_backward()
        if n:
            raise OffloadError(
                f"{what}: {n} offloaded block(s) already stepped during backward (step_in_backward=True), so their "
                f"gradients cannot be clipped, scaled or read any more; call optimizer.step() right after "
                f"backward, or set step_in_backward=False to clip (or otherwise use) the gradients first")

    def may_have_grads(self) -> bool:
        """False when no gradient arrived (or was set) since ``zero_grad``; never waits for the worker."""
        return self._got_grads

    def host_grads(self) -> list[torch.Tensor]:
        """fp32 host gradients of every parameter that received one since the last ``zero_grad``."""
        self._refuse_if_stepped('reading gradients')
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        return [self._grad_view(g, j) for g, j in self._order if g.has_grad[j]]

    def grad_of(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The fp32 host gradient of ``p`` accumulated since ``zero_grad`` (a view of the host buffer), or None."""
        self._refuse_if_stepped('reading a gradient')
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        g, j = self._where[id(p)]
        return self._grad_view(g, j) if g.has_grad[j] else None

    def set_grad_(self, p: nn.Parameter, value: Optional[torch.Tensor]) -> None:
        """Overwrite (``value``) or clear (``None``) the host gradient of ``p`` (pipeline runtimes: all-reduced grads)."""
        self._refuse_if_stepped('setting a gradient')
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        g, j = self._where[id(p)]
        if value is None:
            g.has_grad[j] = False
            g.arrived.discard(j)
        else:
            self._got_grads = True
            g.arrived.add(j)
            dst = self._grad_view(g, j)
            if value.data_ptr() != dst.data_ptr():
                dst.copy_(value.detach().reshape(dst.shape))
            g.has_grad[j] = True
        g.gnorm = None

    def local_grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """Norm of this engine's gradients (a pipeline combines stages' norms, then :meth:`scale_grads_`)."""
        grads = self.host_grads()
        if not grads:
            return torch.tensor(0.0)
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)

    def scale_grads_(self, factor: float | torch.Tensor) -> None:
        self._refuse_if_stepped('scaling gradients')
        grads = self.host_grads()
        if grads:
            torch._foreach_mul_(grads, factor)
            for g in self.groups:
                g.gnorm = None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
        """Same result as ``torch.nn.utils.clip_grad_norm_`` over this engine's parameters.

        With the async pipeline the norm comes from per-block norms computed while gradients were
        folded during backward, and the coefficient is applied inside the next step (fused Adam's
        ``grad_scale``, or a multiply per block in the worker), not in a separate pass here.
        """
        self._refuse_if_stepped('clip_grad_norm_')
        if not self.async_step or float(norm_type) != 2.0:
            grads = self.host_grads()
            if not grads:
                return torch.tensor(0.0)
            total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
            torch._foreach_mul_(grads, coef)
            for g in self.groups:
                g.gnorm = None
            return total
        total = self.grad_norm_from_blocks()
        if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                               f"so it cannot be clipped. To disable this error and scale the gradients by the "
                               f"non-finite norm anyway, set `error_if_nonfinite=False`")
        self.defer_scale_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def grad_norm_from_blocks(self) -> torch.Tensor:
        """The 2-norm of every host gradient, from the per-block norms the async pipeline took while
        backward ran; blocks whose norm is unknown (gradients accumulated over micro-batches) are
        normed now on a thread pool. Without the pipeline: one pass over the host gradients."""
        self._refuse_if_stepped('the gradient norm')
        if not self.async_step:
            grads = self.host_grads()
            return torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.tensor(0.0)
        self.drain(force=True)
        self._materialize_scale()
        todo = [g for g in self.groups if any(g.has_grad) and g.gnorm is None]
        for g in todo:
            if g.keep_grads:   # zeros where no gradient came: the whole buffer's norm is the gradients'
                g.gnorm = torch.linalg.vector_norm(g.dev_grad, 2) if g.dev_grad is not None else torch.zeros(())
        todo = [g for g in todo if not g.keep_grads]
        if todo:
            self._host_norms(todo)
        norms = [g.gnorm.to("cpu", torch.float32) for g in self.groups if any(g.has_grad)]
        return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.tensor(0.0)

    def defer_scale_(self, coef: torch.Tensor) -> None:
        """Multiply every gradient by ``coef`` (a clipping coefficient): with the async pipeline inside
        the next step (fused Adam's ``grad_scale``, or per block on the worker), or when a gradient is
        next read; otherwise now."""
        self._refuse_if_stepped('scaling gradients')
        coef = coef.detach().to("cpu", torch.float32)
        if not self.async_step:
            return self.scale_grads_(coef)
        if float(coef) < 1.0 or not bool(torch.isfinite(coef)):
            self._scale = coef if self._scale is None else self._scale * coef

