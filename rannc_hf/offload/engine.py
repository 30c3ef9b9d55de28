"""The offload engine: host store, per-block residency with prefetch, streamed gradients, host-side step.

One core serves both users: :func:`rannc_hf.offload.offload_module` (hooks on an ``nn.Module``'s
layers) and the pipeline runtime (fences in fx stage graphs, see :mod:`rannc_hf.offload.fences`)::

    import torch
    from rannc_hf.offload import OffloadEngine, offload_enter, offload_exit

    layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-3)
    eng = OffloadEngine([list(l.parameters()) for l in layers], device="cpu", mode="all",
                        optimizer=opt, prefetch_blocks=1)
    h = torch.randn(2, 8, requires_grad=True)
    for i, layer in enumerate(layers):
        h = offload_enter(eng.id, i, h)     # block i resident, i+1 prefetched
        h = layer(h)
        h = offload_exit(eng.id, i, h)      # block i released (kept if its backward comes next)
    h.sum().backward()                      # blocks come back in reverse order, grads go to the host
    eng.clip_grad_norm_(1.0); eng.step(); eng.zero_grad()

Modes (``RanncConfig.offload``):

* ``optimizer``: working copies (compute dtype) stay on the device; fp32 master weights, gradients and
  optimizer state live in host memory; gradients stream to the host as each is produced; the step
  runs on the CPU (torch's fused CPU Adam/AdamW), block by block, each block's new weights copied
  back while the next block steps.
* ``params``: block working copies live on the device only from just before a block's forward (or
  backward) until just after it; fp32 master and gradients live on the host; optimizer state stays
  on the device and the step streams each block's master + gradient through the device.
* ``all``: both: only ``prefetch_blocks + 1`` blocks are on the device at any time, everything else on
  the host, CPU step.

Parameters outside the blocks (the "rest" group: embeddings, heads) keep a resident working copy in
every mode; their master/gradients/state follow the mode. Parameters keep their identity: each
``param.data`` is a view of its block's flat working buffer, whose storage is freed and refilled.

Residency rules (what ``tests/test_offload_schedule.py`` checks): at most ``prefetch_blocks + 1``
offloaded blocks are resident (``max_resident``); with ``prefetch_blocks=0`` two blocks meet for an
instant when backward hands over from block ``i+1`` to ``i`` (both hooks fire on the same tensor). ``before_forward(i)`` releases blocks outside ``i..i+p``, makes ``i`` resident and
prefetches ``i+1..i+p``; ``after_forward(i)`` releases ``i`` unless grad is enabled and ``i`` is one of
the last ``p + 1`` blocks (its backward comes first); ``before_backward(i)`` makes ``i`` resident and
prefetches ``i-1..i-p``; ``after_backward(i)`` releases ``i``. A forward that runs inside a backward
(activation recompute) only makes its block resident. At the end of every backward pass the engine
releases all offloaded blocks. On CUDA, copies run on side streams with events; on CPU they are
synchronous and the same schedule is recorded in ``engine.trace`` when ``trace=True``.
"""

from __future__ import annotations

import itertools
import time
import weakref
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..errors import OffloadError
from .optimizer import (build_inner_optimizer, check_supported, state_bytes_per_param, sync_hyperparams,
                        user_group_index)
from .store import ParamGroup, check_host_memory

MODES = ("optimizer", "params", "all")
_ENGINES: dict[int, "weakref.ref[OffloadEngine]"] = {}
_IDS = itertools.count(1)


def get_engine(engine_id: int) -> "OffloadEngine":
    """The live engine registered under ``engine_id`` (raises :class:`OffloadError` if gone)."""
    ref = _ENGINES.get(engine_id)
    eng = ref() if ref is not None else None
    if eng is None:
        raise OffloadError(f"no offload engine with id {engine_id} (closed or never created)")
    return eng


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover
        return False


class OffloadEngine:
    """Offload for ``blocks`` (lists of parameters, in forward order) plus a resident ``rest`` group.

    Args:
        blocks: parameters of each block, in the order the forward pass runs them.
        device: the compute device (``cuda:N`` or ``cpu``; on CPU every copy is synchronous).
        mode: ``optimizer`` | ``params`` | ``all`` (see the module docstring).
        compute_dtype: dtype of the device working copies (``torch.bfloat16`` for mixed precision);
            masters, gradients on the host and optimizer state are fp32.
        prefetch_blocks: blocks fetched ahead of the one computing (working set ``prefetch_blocks + 1``).
        optimizer: the user's optimizer over (a subset of) these parameters; rebuilt per block over
            the host masters. ``None``: set one later with :meth:`set_optimizer`.
        rest: parameters outside the blocks (always resident). Parameters listed in several blocks,
            or in a block and ``rest``, go to ``rest``.
        check_memory: refuse (``OffloadError``) if the host store would not fit in available RAM.
        trace: record ``(event, block)`` tuples in ``self.trace`` (fetch, wait, release, keep, ...).
        timing: on CUDA, time copies and compute-stream stalls with events (``stats()``).
        cpu_fused: step Adam/AdamW with torch's fused CPU kernel. ``None``: when the device is CUDA
            (speed); on a CPU device the user's kernel choice is kept, so results match bit for bit.
        param_order: the order gradient norms are summed in (``model.parameters()`` order makes
            clipping match ``torch.nn.utils.clip_grad_norm_`` bit for bit); default: the optimizer's.
        async_step: background host pipeline (``None``: on CUDA with a CPU step). Each block's
            gradients are folded into its fp32 buffer (one flat add) and its norm taken on a worker
            thread while backward goes on; clipping then needs only the per-block norms and its
            coefficient is applied inside the step; ``step()`` returns after the resident group and
            the worker steps the blocks in forward order while the next forward runs, each
            ``before_forward(i)`` waiting for block ``i`` alone. Same values as the synchronous path
            up to rounding (norm summation order, fused Adam's ``grad_scale``).
    """

    def __init__(self, blocks: list[list[nn.Parameter]], device: torch.device | str | None = None,
                 mode: str = "all", compute_dtype: torch.dtype = torch.float32, prefetch_blocks: int = 2,
                 optimizer: Optional[torch.optim.Optimizer] = None, rest: Optional[Iterable[nn.Parameter]] = None,
                 check_memory: bool = True, trace: bool = False, timing: bool = False,
                 cpu_fused: Optional[bool] = None, param_order: Optional[Iterable[nn.Parameter]] = None,
                 async_step: Optional[bool] = None, device_step_blocks: int = 0,
                 cpu_threads: Optional[int] = None):
        if mode not in MODES:
            raise OffloadError(f"offload mode must be one of {', '.join(MODES)} for the engine, got {mode!r} "
                               f"('none' needs no engine; 'auto' is resolved by the planner or offload_module)")
        if prefetch_blocks < 0:
            raise OffloadError(f"prefetch_blocks must be >= 0, got {prefetch_blocks}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.mode = mode
        self.compute_dtype = compute_dtype
        self.prefetch_blocks = int(prefetch_blocks)
        self.max_resident = self.prefetch_blocks + 1
        self.offload_params = mode in ("params", "all")
        self.step_on_cpu = mode in ("optimizer", "all")
        self.trace: Optional[list] = [] if trace else None
        self.timing = timing and self.cuda
        self.cpu_fused = self.cuda if cpu_fused is None else bool(cpu_fused)
        # background host pipeline: per-block gradient folds (+ norms) during backward, per-block CPU
        # step after it, overlapped with the next forward (which waits block by block)
        self.async_step = (self.cuda and self.step_on_cpu) if async_step is None else bool(async_step and self.step_on_cpu)
        self._worker = None
        self._fold_futs: list = []
        self._scale = None        # pending clip coefficient (applied inside the next step)
        self.cpu_threads = cpu_threads
        self.wlog: list = []      # (task, block, start, end) perf_counter times of worker tasks (timing=True)
        self._norm_pool = None
        # hybrid step (async pipeline only): the first ``device_step_blocks`` blocks keep their optimizer
        # state on the device and step there (master + gradient streamed in, master back), while the
        # worker steps the other blocks on the CPU at the same time: PCIe and host memory both work
        self.device_step_blocks = int(device_step_blocks) if self.async_step else 0

        block_lists, rest_list = self._partition(blocks, rest)
        if optimizer is not None:
            check_supported(optimizer)
            known = {id(p) for ps in block_lists for p in ps} | {id(p) for p in rest_list}
            missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in known]
            if missing:
                raise OffloadError(f"the optimizer holds {len(missing)} parameter(s) that are in no offload block "
                                   f"and not in `rest`; pass every optimized parameter to the engine")
        if check_memory:
            self._check_host_memory(block_lists, rest_list, optimizer)

        self.blocks = [ParamGroup(i, ps, self.device, compute_dtype, offload=self.offload_params)
                       for i, ps in enumerate(block_lists)]
        self.rest = ParamGroup(len(block_lists), rest_list, self.device, compute_dtype, offload=False)
        self.groups = self.blocks + [self.rest]
        self.num_blocks = len(self.blocks)
        for g in self.groups:  # async pipeline bookkeeping
            g.device_step = g.index < self.device_step_blocks and g is not self.rest
            g.n_req = sum(1 for p in g.params if p.requires_grad)
            g.round, g.round_set = [], set()
            g.fold_fut = g.step_fut = g.step_event = g.gnorm = g.round_start_event = None
            g.dev_norms, g.dev_norms_ok = [], True
        self._where: dict[int, tuple[ParamGroup, int]] = {}
        for g in self.groups:
            for j, p in enumerate(g.params):
                self._where[id(p)] = (g, j)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for g in self.groups for p in g.params if p.requires_grad]

        if self.cuda:
            self.h2d_stream = torch.cuda.Stream(self.device)
            self.d2h_stream = torch.cuda.Stream(self.device)
        self._pending: dict[tuple[int, int], tuple] = {}
        self._resident: list[int] = []           # offloaded blocks whose working copy is allocated
        self._bwd_active: set[int] = set()     # blocks whose backward started and has not finished
        self._kept: set[int] = set()           # blocks kept resident from forward for their backward
        self._last_fwd = -1
        self._bwd_pos: Optional[int] = None
        self._cb_queued = False
        self._copy_events: list = []
        self._stall_events: list = []
        self._stats = dict(h2d_bytes=0, d2h_bytes=0, fetches=0, demand_fetches=0, prefetches=0, releases=0,
                           resident_peak_blocks=0, resident_peak_bytes=0, copy_time_s=0.0, stall_time_s=0.0,
                           step_time_s=0.0, grad_reduce_time_s=0.0, steps=0)
        for b in self.blocks:  # start released: blocks arrive when first needed
            if b.offload:
                b.release()

        order = list(param_order) if param_order is not None else (
            [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else [])
        seen: set[int] = set()
        self._order: list[tuple[ParamGroup, int]] = []
        for p in order + [p for g in self.groups for p in g.params]:
            if id(p) in self._where and id(p) not in seen:
                seen.add(id(p))
                self._order.append(self._where[id(p)])
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._inner: list[Optional[torch.optim.Optimizer]] = []
        self._inner_groups: list[list[int]] = []
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self.id = next(_IDS)
        _ENGINES[self.id] = weakref.ref(self)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _partition(blocks, rest):
        count: dict[int, int] = {}
        for ps in blocks:
            for p in {id(p): p for p in ps}.values():
                count[id(p)] = count.get(id(p), 0) + 1
        rest_list = list({id(p): p for p in (rest or [])}.values())
        rest_ids = {id(p) for p in rest_list}
        block_lists = []
        for ps in blocks:
            keep = []
            seen = set()
            for p in ps:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if count[id(p)] > 1 or id(p) in rest_ids:
                    if id(p) not in rest_ids:
                        rest_list.append(p)
                        rest_ids.add(id(p))
                else:
                    keep.append(p)
            block_lists.append(keep)
        for p in rest_list + [p for ps in block_lists for p in ps]:
            if not p.is_floating_point():
                raise OffloadError(f"offload handles floating-point parameters only, got {p.dtype}")
        return block_lists, rest_list

    def host_bytes_needed(self, block_lists, rest_list, optimizer) -> dict:
        """Bytes of host memory the store needs, by kind (used by the host-memory check)."""
        n = sum(p.numel() for ps in block_lists for p in ps) + sum(p.numel() for p in rest_list)
        item = torch.empty(0, dtype=self.compute_dtype).element_size()
        out = {"fp32 master weights": 4 * n, "fp32 gradients": 4 * n,
               "compute-dtype shadow": item * n if self.compute_dtype != torch.float32 else 0,
               "gradient staging": item * n if self.cuda else 0,
               "optimizer state": 0}
        if optimizer is not None and self.step_on_cpu:
            out["optimizer state"] = int(state_bytes_per_param(optimizer) * n)
        return out

    def _check_host_memory(self, block_lists, rest_list, optimizer) -> None:
        need = self.host_bytes_needed(block_lists, rest_list, optimizer)
        check_host_memory(sum(need.values()), need, self.mode)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Rebuild ``optimizer`` (class, hyperparameters, groups) per block over the host masters."""
        self.synchronize()
        check_supported(optimizer)
        self.optimizer = optimizer
        self._inner, self._inner_groups = [], []
        for g in self.groups:
            host_of = {id(p): hp for p, hp in zip(g.params, g.host_params)}
            inner = build_inner_optimizer(optimizer, host_of, g.params,
                                          step_on_cpu=self.step_on_cpu and not getattr(g, "device_step", False),
                                          cpu_fused=self.cpu_fused)
            self._inner.append(inner)
            self._inner_groups.append(user_group_index(optimizer, g.params) if inner is not None else [])
        if any(len(s) for s in optimizer.state.values()):  # already stepped: carry its state over
            self.load_optimizer_state_dict(torch.optim.Optimizer.state_dict(optimizer))
            optimizer.state.clear()

    # ------------------------------------------------------------------ residency
    def _log(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, i))

    def resident_blocks(self) -> list[int]:
        """Offloaded blocks whose working copy is on the device now (including in-flight prefetches)."""
        return sorted(self._resident)

    def _fetch(self, i: int, prefetch: bool) -> None:
        g = self.blocks[i]
        if g.resident:
            return
        self._wait_group_step(g)
        if self.cuda:
            s = self.h2d_stream
            with torch.cuda.stream(s):
                if self.timing:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e0.record(s)
                g.work.untyped_storage().resize_(g.work_bytes)
                g.work.copy_(g.shadow, non_blocking=True)
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record(s)
                if self.timing:
                    self._copy_events.append((e0, ev))
            g.resident = True
            g.ready_event = ev
        else:
            t0 = time.perf_counter()
            g.fetch()
            self._stats["copy_time_s"] += time.perf_counter() - t0
        self._resident.append(i)
        st = self._stats
        st["h2d_bytes"] += g.work_bytes
        st["fetches"] += 1
        st["prefetches" if prefetch else "demand_fetches"] += 1
        st["resident_peak_blocks"] = max(st["resident_peak_blocks"], len(self._resident))
        st["resident_peak_bytes"] = max(st["resident_peak_bytes"],
                                        sum(self.blocks[j].work_bytes for j in self._resident))
        self._log("prefetch" if prefetch else "fetch", i)

    def _ensure(self, i: int) -> None:
        g = self.blocks[i]
        if not g.resident:
            self._fetch(i, prefetch=False)
        if self.cuda and g.ready_event is not None:
            cur = torch.cuda.current_stream(self.device)
            if self.timing:
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record(cur)
            cur.wait_event(g.ready_event)
            if self.timing:
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record(cur)
                self._stall_events.append((e0, e1))
            g.work.record_stream(cur)
            g.ready_event = None

    def _release(self, i: int) -> None:
        g = self.blocks[i]
        if not g.offload or not g.resident:
            return
        if self.cuda and g.ready_event is not None:  # prefetched, never used: keep stream order safe
            torch.cuda.current_stream(self.device).wait_event(g.ready_event)
        g.release()
        self._resident.remove(i)
        self._stats["releases"] += 1
        self._log("release", i)

    def _top_up(self, order: Iterable[int]) -> None:
        for j in order:
            if len(self._resident) >= self.max_resident:
                break
            if not self.blocks[j].resident:
                self._fetch(j, prefetch=True)

    def _fwd_window(self, i: int) -> list[int]:
        return list(range(i, min(self.num_blocks, i + self.prefetch_blocks + 1)))

    def _bwd_window(self, i: int) -> list[int]:
        return list(range(i, max(-1, i - self.prefetch_blocks - 1), -1))

    def _release_outside(self, window: list[int]) -> None:
        for j in list(self._resident):
            if j not in window and j not in self._bwd_active and j not in self._kept:
                self._release(j)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_blocks:
            raise OffloadError(f"offload block index {i} out of range (engine has {self.num_blocks} blocks)")

    # -- the four transitions ------------------------------------------------------------------
    def before_forward(self, i: int) -> None:
        """Block ``i`` is about to run forward: make it resident and prefetch the next blocks."""
        self._check_index(i)
        if not self.offload_params:
            self._wait_group_step(self.blocks[i])
            return
        if _in_backward():  # activation recompute inside backward
            self._log("recompute", i)
            self._queue_backward_end()
            self._ensure(i)
            self._top_up(self._bwd_window(i)[1:])
            return
        if i <= self._last_fwd:  # a new forward pass: blocks kept for the last one's backward go
            self._kept.clear()
        self._last_fwd = i
        window = self._fwd_window(i)
        self._release_outside(window)
        self._ensure(i)
        self._log("forward", i)
        self._top_up(window[1:])

    def after_forward(self, i: int) -> None:
        """Block ``i``'s forward is done: release it unless its backward comes soon."""
        self._check_index(i)
        if not self.offload_params or _in_backward():
            return
        if torch.is_grad_enabled() and i >= self.num_blocks - 1 - self.prefetch_blocks:
            self._kept.add(i)
            self._log("keep", i)
            return
        self._release(i)

    def before_backward(self, i: int) -> None:
        """Gradients reached block ``i``'s outputs: make it resident, prefetch ``i-1 .. i-p``."""
        self._check_index(i)
        self._queue_backward_end()
        if not self.offload_params:
            return
        if i in self._bwd_active:
            return
        self._kept.clear()
        self._last_fwd = -1
        self._bwd_active.add(i)
        self._bwd_pos = i
        window = self._bwd_window(i)
        self._release_outside(window)
        self._ensure(i)
        self._log("backward", i)
        self._top_up(window[1:])

    def after_backward(self, i: int) -> None:
        """Block ``i``'s backward is done (gradients of its inputs exist): release it."""
        self._check_index(i)
        self.drain(force=False)
        if not self.offload_params:
            return
        self._bwd_active.discard(i)
        self._release(i)
        if self._bwd_pos is not None:
            self._top_up(self._bwd_window(self._bwd_pos)[1:])

    def _queue_backward_end(self) -> None:
        if self._cb_queued or not _in_backward():
            return
        self._cb_queued = True
        ref = weakref.ref(self)

        def _cb():
            eng = ref()
            if eng is not None:
                eng._on_backward_end()

        torch.autograd.Variable._execution_engine.queue_callback(_cb)

    def _on_backward_end(self) -> None:
        self._cb_queued = False
        self._bwd_active.clear()
        self._kept.clear()
        self._last_fwd = -1
        self._bwd_pos = None
        for j in list(self._resident):
            self._release(j)
        self._log("backward_end", -1)
        self.drain(force=False)

    def release_all(self) -> None:
        """Release every offloaded block (e.g. after an eval forward whose backward never comes)."""
        self._bwd_active.clear()
        self._kept.clear()
        self._last_fwd = -1
        for j in list(self._resident):
            self._release(j)

    # ------------------------------------------------------------------ gradients
    def _on_grad(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        g, j = self._where[id(p)]
        self._stats["d2h_bytes"] += grad.numel() * grad.element_size()
        if not self.cuda:
            g.gnorm = None
            t0 = time.perf_counter()
            dst = g.view(g.grad, j)
            if g.has_grad[j]:
                dst.add_(grad)
            else:
                dst.copy_(grad)
            g.has_grad[j] = True
            self._stats["grad_reduce_time_s"] += time.perf_counter() - t0
        elif self.async_step:
            if j in g.round_set:  # a parameter came twice before its block completed: fold what arrived
                self._submit_round(g)
            if not g.round:  # staging is about to be overwritten: its previous fold must be done
                if g.fold_fut is not None:
                    g.fold_fut.result()
                    g.fold_fut = None
            s = self.d2h_stream
            s.wait_stream(torch.cuda.current_stream(self.device))
            if not g.has_grad[j]:  # first arrival since zero_grad: the host grad will be this one, upcast
                g.dev_norms.append(torch.linalg.vector_norm(grad, 2, dtype=torch.float32))
            else:
                g.dev_norms_ok = False
            with torch.cuda.stream(s):
                if self.timing and not g.round:
                    g.round_start_event = torch.cuda.Event(enable_timing=True)
                    g.round_start_event.record(s)
                g.view(g.staging, j).copy_(grad, non_blocking=True)
            grad.record_stream(s)
            g.round.append(j)
            g.round_set.add(j)
            if len(g.round) == g.n_req:
                self._submit_round(g)
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
        p.grad = None

    # -- background worker (async host pipeline) -----------------------------------------------
    def _pool(self):
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            n = self.cpu_threads or torch.get_num_threads()  # a new thread would not inherit set_num_threads
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rannc-offload",
                                              initializer=torch.set_num_threads, initargs=(n,))
        return self._worker

    def _submit_round(self, g: ParamGroup) -> None:
        """Hand the gradients of ``g`` copied since its last fold to the worker (one event, one fold)."""
        js = g.round
        g.round, g.round_set = [], set()
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
        fut = self._pool().submit(self._fold_task, g, js, ev, dn)
        g.fold_fut = fut
        self._fold_futs.append(fut)

    def _fold_task(self, g: ParamGroup, js: list[int], ev, dev_norm=None) -> None:
        """Fold one block's staged gradients into its fp32 buffer: one flat copy (first micro-batch:
        its norm is ``dev_norm``, taken on the GPU from the same values) or a chunked add through an
        fp32 temporary (mixed-dtype ``add_`` is several times slower on the CPU)."""
        tw = time.perf_counter()
        ev.synchronize()
        t0 = time.perf_counter()
        n = len(g.params)
        if len(js) == n and (all(g.has_grad) or not any(g.has_grad)):
            if all(g.has_grad):
                chunk = 1 << 20
                tmp = torch.empty(min(chunk, g.numel), dtype=torch.float32)
                for o in range(0, g.numel, chunk):
                    d = g.grad[o:o + chunk]
                    t = tmp[:d.numel()]
                    t.copy_(g.staging[o:o + chunk])
                    d.add_(t)
                g.gnorm = None
            else:
                g.grad.copy_(g.staging)
                g.gnorm = dev_norm
            g.has_grad = [True] * n
        else:
            for j in js:
                dst, src = g.view(g.grad, j), g.view(g.staging, j)
                if g.has_grad[j]:
                    dst.add_(src)
                else:
                    dst.copy_(src)
                g.has_grad[j] = True
            g.gnorm = None
        t1 = time.perf_counter()
        self._stats["grad_reduce_time_s"] += t1 - t0
        if self.timing:
            self.wlog.append(("fold", g.index, tw, t0, t1))

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
                                                 initializer=torch.set_num_threads, initargs=(1,))
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
        for f in futs:
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
            grads = [g.view(g.grad, j) for g, j in self._order if g.has_grad[j]]
            if grads:
                torch._foreach_mul_(grads, coef)
            for g in self.groups:
                g.gnorm = None

    def _finish(self, key, item) -> None:
        g, j, ev = item
        ev.synchronize()
        t0 = time.perf_counter()
        dst = g.view(g.grad, j)
        src = g.view(g.staging, j)
        if g.has_grad[j]:
            dst.add_(src)
        else:
            dst.copy_(src)
        g.has_grad[j] = True
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
        self._scale = None
        for g in self.groups:
            g.has_grad = [False] * len(g.params)
            g.gnorm = None
            g.dev_norms, g.dev_norms_ok = [], True
            for p in g.params:
                p.grad = None

    def host_grads(self) -> list[torch.Tensor]:
        """fp32 host gradients of every parameter that received one since the last ``zero_grad``."""
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        return [g.view(g.grad, j) for g, j in self._order if g.has_grad[j]]

    def grad_of(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The fp32 host gradient of ``p`` accumulated since ``zero_grad`` (a view of the host buffer), or None."""
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        g, j = self._where[id(p)]
        return g.view(g.grad, j) if g.has_grad[j] else None

    def set_grad_(self, p: nn.Parameter, value: Optional[torch.Tensor]) -> None:
        """Overwrite (``value``) or clear (``None``) the host gradient of ``p`` (pipeline runtimes: all-reduced grads)."""
        self.synchronize()
        self.drain(force=True)
        self._materialize_scale()
        g, j = self._where[id(p)]
        if value is None:
            g.has_grad[j] = False
        else:
            dst = g.view(g.grad, j)
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
        self.drain(force=True)
        self._materialize_scale()
        todo = [g for g in self.groups if any(g.has_grad) and g.gnorm is None]
        if todo:
            self._host_norms(todo)
        norms = [g.gnorm.to("cpu", torch.float32) for g in self.groups if any(g.has_grad)]
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2)
        if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                               f"so it cannot be clipped. To disable this error and scale the gradients by the "
                               f"non-finite norm anyway, set `error_if_nonfinite=False`")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(coef) < 1.0 or not bool(torch.isfinite(coef)):
            self._scale = coef
        return total

    # ------------------------------------------------------------------ optimizer step
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
                self._device_step_async(g, inner, has, scale)
            else:
                g.step_fut = self._pool().submit(self._step_group, g, inner, has, scale, bwd_done)
        self._stats["step_time_s"] += time.perf_counter() - t0  # the blocks' time is added by the worker
        self._stats["steps"] += 1
        self.optimizer._opt_called = True

    def _device_step_async(self, g: ParamGroup, inner, has: list, scale) -> None:
        """Step ``g`` on the device (state resident there): master and gradient in, new master and
        compute-dtype shadow back, working copy cast on the device; all on the compute stream, no wait."""
        dev = self.device
        m = g.master.to(dev, non_blocking=True)
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
        self._stats["h2d_bytes"] += g.master.nbytes + g.grad.nbytes

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

    # ------------------------------------------------------------------ state
    def master_of(self, p: nn.Parameter) -> torch.Tensor:
        """The fp32 host master of device parameter ``p`` (a view: do not keep it across steps)."""
        self.synchronize()
        g, j = self._where[id(p)]
        return g.view(g.master, j)

    def owns(self, p: torch.Tensor) -> bool:
        return id(p) in self._where

    def load_param_(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Set parameter ``p`` (master, shadow and, if resident, working copy) to ``value``."""
        self.synchronize()
        g, j = self._where[id(p)]
        g.view(g.master, j).copy_(value.detach().reshape(g.shapes[j]))
        if g.shadow is not g.master:
            g.view(g.shadow, j).copy_(g.view(g.master, j))
        if g.resident:
            if g.ready_event is not None and self.cuda:
                g.ready_event.synchronize()
            g.view(g.work, j).copy_(g.view(g.shadow, j))

    def _user_index(self):
        out = []
        for ug in self.optimizer.param_groups:
            for p in ug["params"]:
                out.append(p)
        return out

    def optimizer_state_dict(self) -> dict:
        """The state dict the user's optimizer would have (its parameter indices, its groups)."""
        self.synchronize()
        if self.optimizer is None:
            raise OffloadError("the offload engine has no optimizer")
        state = {}
        for k, p in enumerate(self._user_index()):
            g, j = self._where[id(p)]
            inner = self._inner[self.groups.index(g)]
            st = inner.state.get(g.host_params[j]) if inner is not None else None
            if st:
                state[k] = dict(st)
        groups, k = [], 0
        for ug in self.optimizer.param_groups:
            d = {key: v for key, v in ug.items() if key != "params"}
            d["params"] = list(range(k, k + len(ug["params"])))
            k += len(ug["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Load a state dict in the user's optimizer's format (from :meth:`optimizer_state_dict` or torch)."""
        self.synchronize()
        if self.optimizer is None:
            raise OffloadError("the offload engine has no optimizer")
        ugroups = sd["param_groups"]
        if len(ugroups) != len(self.optimizer.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(ugroups, self.optimizer.param_groups)):
            raise OffloadError("optimizer state dict does not match the optimizer's param groups (group count or sizes)")
        for ug, sg in zip(self.optimizer.param_groups, ugroups):
            for key, v in sg.items():
                if key != "params":
                    ug[key] = v
        by_saved_index = {}
        for ug, sg in zip(self.optimizer.param_groups, ugroups):
            for p, k in zip(ug["params"], sg["params"]):
                by_saved_index[k] = p
        per_inner: dict[int, dict] = {}
        for k, st in sd["state"].items():
            p = by_saved_index[int(k)]
            g, j = self._where[id(p)]
            per_inner.setdefault(self.groups.index(g), {})[g.host_params[j]] = st
        for gi, inner in enumerate(self._inner):
            if inner is None:
                continue
            sync_hyperparams(self.optimizer, inner, self._inner_groups[gi])
            local = {}
            idx = 0
            groups = []
            states = per_inner.get(gi, {})
            for ig in inner.param_groups:
                ids = []
                for hp in ig["params"]:
                    if hp in states:
                        local[idx] = states[hp]
                    ids.append(idx)
                    idx += 1
                groups.append({**{k: v for k, v in ig.items() if k != "params"}, "params": ids})
            inner.load_state_dict({"state": local, "param_groups": groups})
            if (not self.step_on_cpu or self.groups[gi].device_step) and self.cuda:  # state lives on the device
                for st in inner.state.values():
                    for key, v in st.items():
                        if torch.is_tensor(v) and key != "step":
                            st[key] = v.to(self.device)

    # ------------------------------------------------------------------ stats / close
    def stats(self) -> dict:
        """Counters: bytes copied each way, copy and stall time, resident peak, step time."""
        self.synchronize()
        st = dict(self._stats)
        if self.cuda and self.timing:
            torch.cuda.synchronize(self.device)
            st["copy_time_s"] += sum(a.elapsed_time(b) for a, b in self._copy_events) / 1e3
            st["stall_time_s"] += sum(a.elapsed_time(b) for a, b in self._stall_events) / 1e3
            self._stats["copy_time_s"], self._stats["stall_time_s"] = st["copy_time_s"], st["stall_time_s"]
            self._copy_events.clear()
            self._stall_events.clear()
        st["hidden_fraction"] = (max(0.0, 1.0 - st["stall_time_s"] / st["copy_time_s"])
                                 if st["copy_time_s"] > 0 else 1.0)
        st["host_bytes"] = sum(g.host_bytes() for g in self.groups)
        st["mode"] = self.mode
        st["num_blocks"] = self.num_blocks
        return st

    def reset_stats(self) -> None:
        for k, v in self._stats.items():
            self._stats[k] = type(v)(0)

    def close(self, restore: bool | str = True) -> None:
        """Remove hooks and, if ``restore``, give every parameter a normal tensor with its fp32 master values:
        on the compute device (``True``) or on the host (``"cpu"``); ``False`` leaves parameters as they are."""
        self.synchronize()
        self.drain(force=True)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._norm_pool is not None:
            self._norm_pool.shutdown(wait=True)
            self._norm_pool = None
        if restore:
            dev = torch.device("cpu") if restore == "cpu" else self.device
            need = sum(g.master.nbytes for g in self.groups)
            try:
                for g in self.groups:
                    for j, p in enumerate(g.params):
                        p.data = g.view(g.master, j).to(dev, copy=True)
            except torch.OutOfMemoryError:
                raise OffloadError(f"restoring the fp32 parameters ({need / 2**30:.2f} GiB) to {dev} ran out of "
                                   f"memory: the model is larger than the GPU; use restore='cpu' (or False)") from None
        _ENGINES.pop(getattr(self, "id", -1), None)
