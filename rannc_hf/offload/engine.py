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

The step comes after backward (``step()``), racing the next forward block by block; with
``step_in_backward=True`` (no clipping) each block steps as soon as its last gradient arrives in backward and
``step()`` only finishes the rest group::

    eng = OffloadEngine(..., step_in_backward=True)   # CUDA, or async_step=True on CPU
    loss.backward()                                   # blocks step here, in backward order
    eng.step(); eng.zero_grad()                       # clip_grad_norm_ in between is refused

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

Layout: this module holds construction, the optimizer wiring and ``close``; the rest of
:class:`OffloadEngine` comes from one mixin per concern: :mod:`.residency` (which blocks are on the
device), :mod:`.gradients` (streaming, folds, norms, clipping), :mod:`.stepping` (the optimizer step)
and :mod:`.engine_state` (masters, state dicts, stats).
"""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..config import env_flag, env_int
from ..errors import OffloadError
from .engine_state import _StateMixin
from .gradients import _GradientMixin
from .optimizer import build_inner_optimizer, check_supported, state_bytes_per_param, user_group_index
from .residency import _ResidencyMixin
from .stepping import _StepMixin
from .cost import spread
from . import switch_interval
from .store import ParamGroup, check_host_memory, host_need

MODES = ("optimizer", "params", "all")
_ENGINES: dict[int, "weakref.ref[OffloadEngine]"] = {}
_IDS = itertools.count(1)


def device_grads_default() -> bool:
    """``RANNC_HF_OFFLOAD_DEVICE_GRADS``: GPU-stepped blocks keep their gradients on the GPU (off by default
    until timed on a GPU); the runtime and the planner budget 4 more bytes per such parameter."""
    return bool(env_flag("RANNC_HF_OFFLOAD_DEVICE_GRADS"))


def get_engine(engine_id: int) -> "OffloadEngine":
    """The live engine registered under ``engine_id`` (raises :class:`OffloadError` if gone)."""
    ref = _ENGINES.get(engine_id)
    eng = ref() if ref is not None else None
    if eng is None:
        raise OffloadError(f"no offload engine with id {engine_id} (closed or never created)")
    return eng



def local_world_size() -> int:
    """Processes of this job on this host (``LOCAL_WORLD_SIZE``, set by ``torchrun``/``accelerate launch``; 1
    without a launcher): they share its cores and its memory bus."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def host_step_threads() -> int:
    """Threads for the host optimizer step: torch's count, but at least this process's share of the cores it may
    run on (its CPU affinity divided by ``LOCAL_WORLD_SIZE``). ``torchrun`` and ``accelerate launch`` set
    ``OMP_NUM_THREADS=1`` in every process, which left the step on one core: GPT-2 2.7B over two pipeline ranks
    (1.39B parameters each) took 7.6 s a step on a 32-core H200 host against 1.3 s planned."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(torch.get_num_threads(), cores // local_world_size(), 1)


class OffloadEngine(_ResidencyMixin, _GradientMixin, _StepMixin, _StateMixin):
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
        stream_step_blocks: of the blocks the CPU would step, how many step on the GPU instead, their fp32
            optimizer state streamed in from pinned host buffers and back with the master (16 bytes per
            parameter in, 14 out with bf16 compute): PCIe and host memory bandwidth then share the step that
            follows backward. Spread evenly over those blocks in forward order. Default
            ``$RANNC_HF_OFFLOAD_STREAM_STEP`` or 0; :func:`~rannc_hf.offload.cost.choose_stream_step_blocks` picks
            a count from the rates.
        async_step: background host pipeline (``None``: on CUDA with a CPU step). Each block's
            gradients are folded into its fp32 buffer (one flat add) and its norm taken on a worker
            thread while backward goes on; clipping then needs only the per-block norms and its
            coefficient is applied inside the step; ``step()`` returns after the resident group and
            the worker steps the blocks in forward order while the next forward runs, each
            ``before_forward(i)`` waiting for block ``i`` alone. Same values as the synchronous path
            up to rounding (norm summation order, fused Adam's ``grad_scale``).
        device_accumulate: on CUDA, within a pass announced by :meth:`begin_pass` (the pipeline runtime's
            micro-batches), sum each parameter's gradients in an fp32 device buffer (4 bytes per parameter,
            held during the pass) and send only the sum to the host (a CPU device runs the same path).
        device_grads: GPU-stepped blocks (``device_step_blocks``) keep their gradients on the device in an fp32
            buffer (4 bytes per parameter until ``zero_grad``) that their step reads in place: no gradient
            crosses PCIe for them either way. Default ``$RANNC_HF_OFFLOAD_DEVICE_GRADS`` or off (not yet
            timed on a GPU).
        step_in_backward: step each block as soon as its last gradient of the step arrives in backward (on the
            worker for CPU-stepped blocks, off the compute stream for GPU-stepped ones, whose gradients then never
            leave the device), instead of after backward: the CPU step overlaps the rest of backward, like torch's
            optimizer-in-backward. Every backward (or pass of :meth:`begin_pass`) is then an optimizer step:
            call ``step()`` after each; clipping, scaling or reading gradients between them is refused with
            :class:`~rannc_hf.errors.OffloadError`. Needs the async pipeline; with several micro-batches per
            pass, ``device_accumulate`` too (otherwise the pass steps after backward as usual).
        gpu_step_rest: the rest group (embeddings, heads: always resident) keeps its fp32 master, optimizer state
            and gradients on the device too (16 more bytes per parameter there with AdamW) and ``step()`` steps it
            there, a few GPU kernels, instead of on the host while the GPU waits for the next forward's first
            layer (GPT-2 2.7B: about 50 ms a step). Needs the async pipeline.
        prepare: called with each group's index (block ``i``, then ``len(blocks)`` for the rest) just before
            the engine copies that group's parameters into its host store: :func:`offload_module` gives
            meta-device parameters their values there, one block at a time.
    """

    def __init__(self, blocks: list[list[nn.Parameter]], device: torch.device | str | None = None,
                 mode: str = "all", compute_dtype: torch.dtype = torch.float32, prefetch_blocks: int = 2,
                 optimizer: Optional[torch.optim.Optimizer] = None, rest: Optional[Iterable[nn.Parameter]] = None,
                 check_memory: bool = True, trace: bool = False, timing: bool = False,
                 cpu_fused: Optional[bool] = None, param_order: Optional[Iterable[nn.Parameter]] = None,
                 async_step: Optional[bool] = None, device_step_blocks: int = 0,
                 cpu_threads: Optional[int] = None, stream_step_blocks: Optional[int] = None,
                 device_accumulate: bool = False, device_grads: Optional[bool] = None,
                 step_in_backward: bool = False, gpu_step_rest: bool = False,
                 prepare: Optional[Callable[[int], None]] = None):
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
        self._switch_share = None   # its part of the shortened GIL switch interval (switch_interval.py)
        self._fold_futs: list = []
        self._scale = None        # pending clip coefficient (applied inside the next step)
        self._inv_scale = None    # (scale, 1 / scale as fp32): the fused CPU kernels' grad_scale for this step
        self._got_grads = False   # a gradient arrived since zero_grad (main-thread flag: no wait on the worker)
        # threads of the CPU step (``RANNC_HF_OFFLOAD_CPU_THREADS`` for sweeps: the step is memory-bound and shares
        # the cores with the main thread and the copies); default: :func:`host_step_threads`
        if cpu_threads is None:
            cpu_threads = env_int("RANNC_HF_OFFLOAD_CPU_THREADS")
        self.cpu_threads = cpu_threads if cpu_threads is not None else host_step_threads()
        self.wlog: list = []      # (task, block, queued, start, end) perf_counter times: worker tasks, marks (timing=True)
        self._norm_pool = None
        # hybrid step (async pipeline only): the first ``device_step_blocks`` blocks keep their optimizer
        # state on the device and step there (master + gradient streamed in, master back), while the
        # worker steps the other blocks on the CPU at the same time: PCIe and host memory both work
        self.device_step_blocks = int(device_step_blocks) if self.async_step else 0
        if stream_step_blocks is None:
            stream_step_blocks = env_int("RANNC_HF_OFFLOAD_STREAM_STEP", 0)
        self.stream_step_blocks = int(stream_step_blocks) if self.async_step else 0
        self.device_accumulate = bool(device_accumulate)
        self.device_grads = device_grads_default() if device_grads is None else bool(device_grads)
        self._pass_mb = 1          # micro-batches of the pass under way (begin_pass)
        self.step_in_backward = bool(step_in_backward) and self.async_step
        self._early = self.step_in_backward   # this pass steps blocks during backward (begin_pass decides)
        self.gpu_step_rest = bool(gpu_step_rest) and self.async_step
        self.rest_first = bool(env_flag("RANNC_HF_OFFLOAD_REST_FIRST"))   # the step order before the 17th session

        block_lists, rest_list = self._partition(blocks, rest)
        if optimizer is not None:
            check_supported(optimizer)
            block_lists, rest_list = self._by_param_group(block_lists, rest_list, optimizer)
            known = {id(p) for ps in block_lists for p in ps} | {id(p) for p in rest_list}
            missing = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in known]
            if missing:
                raise OffloadError(f"the optimizer holds {len(missing)} parameter(s) that are in no offload block "
                                   f"and not in `rest`; pass every optimized parameter to the engine")
        if check_memory:
            self._check_host_memory(block_lists, rest_list, optimizer)

        def group(i: int, ps: list, **kw) -> ParamGroup:
            if prepare is not None:
                prepare(i)
            return ParamGroup(i, ps, self.device, compute_dtype, **kw)

        self.blocks = [group(i, ps, offload=self.offload_params, host_grads=not self._keeps_grads(i))
                       for i, ps in enumerate(block_lists)]
        self.rest = group(len(block_lists), rest_list, offload=False, host_grads=not self.gpu_step_rest)
        self.groups = self.blocks + [self.rest]
        self.num_blocks = len(self.blocks)
        for g in self.groups:  # async pipeline bookkeeping
            on_device_rest = g is self.rest and self.gpu_step_rest
            g.device_step = (g.index < self.device_step_blocks and g is not self.rest) or on_device_rest
            g.stream_step = False
            g.sstate = {}   # streamed optimizer state: key -> flat pinned host buffer
            g.keep_grads = (g is not self.rest and self._keeps_grads(g.index)) or on_device_rest
            g.dev_master = None   # the rest group stepped on the device: its fp32 master there (made by its first step)
            g.n_req = sum(1 for p in g.params if p.requires_grad)
            g.round, g.round_set, g.round_direct = [], set(), set()
            g.pending, g.pending_bytes = [], 0   # (j, gradient, first) queued for the copy stream (_flush_pending)
            g.arrived = set()   # parameters with a gradient since zero_grad (main thread's view)
            g.fold_fut = g.step_fut = g.step_event = g.gnorm = g.round_start_event = None
            g.dev_norms, g.dev_norms_ok = [], True
            g.early = False          # stepped during this step's backward (step_in_backward), step() not yet called
            g.pass_seen = [0] * len(g.params)
            g.pass_final = 0
        self._where: dict[int, tuple[ParamGroup, int]] = {}
        for g in self.groups:
            for j, p in enumerate(g.params):
                self._where[id(p)] = (g, j)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for g in self.groups for p in g.params if p.requires_grad]

        cpu_side = [g for g in self.blocks if not g.device_step]
        for g in spread(cpu_side, self.stream_step_blocks):
            g.stream_step = True
        self.stream_step_blocks = sum(g.stream_step for g in self.blocks)
        # GPU steps (device-stepped and streamed blocks) run off the compute stream: inputs on one stream,
        # the step and the results' trip back on another, through a two-slot device ring (stepping.py)
        self._step_in = torch.cuda.Stream(self.device) if self.cuda else None
        self._step_out = torch.cuda.Stream(self.device) if self.cuda else None
        self._ring = None
        self._ring_pos = 0
        self._grad_pool: list = []   # (fp32 device buffer, event of its last step): gradients stepped in backward
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
                           step_time_s=0.0, grad_reduce_time_s=0.0, steps=0, kept_grad_bytes=0,
                           early_block_steps=0, rest_step_time_s=0.0, cpu_block_step_time_s=0.0,
                           cpu_block_refill_time_s=0.0, cpu_block_steps=0, worker_task_time_s=0.0,
                           worker_overlap_s=0.0)
        self._worker_idents: set[int] = set()   # threads that ran step-worker tasks (_note_worker_task)
        self._last_task_end = 0.0
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
        self._flat: dict = {}
        self._inner_groups: list[list[int]] = []
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self.id = next(_IDS)
        _ENGINES[self.id] = weakref.ref(self)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _by_param_group(block_lists: list, rest_list: list, optimizer: torch.optim.Optimizer) -> tuple[list, list]:
        """Each block's parameters in the optimizer's order (param group, then place in the group; unoptimized
        ones last, in their order), so that every group is one run of a block's flat buffer, in the order the
        CPU step lists it, and can be stepped flat (``flat_step.py``): the usual decay / no-decay groups alternate a
        layer's weights and biases."""
        rank = {id(p): (k, i) for k, ug in enumerate(optimizer.param_groups) for i, p in enumerate(ug["params"])}
        last = (len(optimizer.param_groups), 0)

        def order(ps: list) -> list:
            return sorted(ps, key=lambda p: rank.get(id(p), last))

        return [order(ps) for ps in block_lists], order(rest_list)

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

    def _keeps_grads(self, block: int) -> bool:
        """Block ``block`` steps on the device and keeps its gradients there (no host gradient buffers)."""
        return self.device_grads and block < self.device_step_blocks

    def host_bytes_needed(self, block_lists, rest_list, optimizer) -> dict:
        """Bytes of host memory the store needs, by kind (used by the host-memory check): GPU-stepped blocks
        keep their optimizer state on the device, and with ``device_grads`` their gradients too."""
        sizes = [sum(p.numel() for p in ps) for ps in block_lists]
        on_device = sum(sizes[:self.device_step_blocks])
        kept = on_device if self.device_grads else 0
        if self.gpu_step_rest:
            n_rest = sum(p.numel() for p in rest_list)
            on_device, kept = on_device + n_rest, kept + n_rest
        state = state_bytes_per_param(optimizer) if optimizer is not None and self.step_on_cpu else 0.0
        return host_need(sum(sizes) + sum(p.numel() for p in rest_list), self.compute_dtype, self.cuda, state,
                         on_device, kept)

    def _check_host_memory(self, block_lists, rest_list, optimizer) -> None:
        need = self.host_bytes_needed(block_lists, rest_list, optimizer)
        check_host_memory(sum(need.values()), need, self.mode)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Rebuild ``optimizer`` (class, hyperparameters, groups) per block over the host masters."""
        self.synchronize()
        check_supported(optimizer)
        self.optimizer = optimizer
        self._inner, self._inner_groups = [], []
        self._flat = {}   # block index -> FlatStep or None, made at the block's first CPU step (stepping._cpu_step)
        for g in self.groups:
            host_of = {id(p): hp for p, hp in zip(g.params, g.host_params)}
            inner = build_inner_optimizer(optimizer, host_of, g.params,
                                          step_on_cpu=self.step_on_cpu and not (getattr(g, "device_step", False)
                                                                                 or getattr(g, "stream_step", False)),
                                          cpu_fused=self.cpu_fused)
            self._inner.append(inner)
            self._inner_groups.append(user_group_index(optimizer, g.params) if inner is not None else [])
        if any(len(s) for s in optimizer.state.values()):  # already stepped: carry its state over
            self.load_optimizer_state_dict(torch.optim.Optimizer.state_dict(optimizer))
            optimizer.state.clear()

    # ------------------------------------------------------------------ close
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
            switch_interval.restore(self._switch_share)
            self._switch_share = None
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
