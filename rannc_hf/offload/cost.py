"""Offload cost model: how much memory a mode needs where, and how much time it adds to a step.

Pure functions of sizes and rates (no torch, no device), so the planner can price offload for any
stage on any machine, and the engine can check its own choices against the same numbers::

    >>> from rannc_hf.offload.cost import offload_cost
    >>> c = offload_cost(param_bytes=2.7e9 * 4, grad_bytes=2.7e9 * 2, optim_bytes=2.7e9 * 8,
    ...                  fwd_time=0.14, bwd_time=0.28, link_gbps=55.0, cpu_adam_params_per_s=4.0e9,
    ...                  mode="all", num_blocks=32, prefetch_blocks=2)
    >>> round(c.optimizer_time, 3), c.hidden_fraction > 0.5
    (0.675, True)

Conventions: ``param_bytes`` is the fp32 master size (4 bytes per parameter); ``grad_bytes`` the
size of the gradients as they leave the GPU (compute dtype, 2 bytes per parameter for bf16);
``optim_bytes`` the optimizer state (8 bytes per parameter for Adam/AdamW). ``link_gbps`` is the
host<->GPU bandwidth in **gigabytes** per second, one direction (55 for pinned PCIe Gen5 on an H200);
``duplex_gbps`` the sum of both directions at once (75 there, measured). Times are seconds per micro-batch
(``fwd_time``, ``bwd_time``, without recompute) on the GPU with all weights resident.

Model (what the engine does, see ``engine.py``):

* ``params`` / ``all``: every block's compute-dtype weights cross the link before its forward and
  again before its backward, except the ``prefetch_blocks + 1`` last blocks, which stay resident
  from forward to backward. Copies of block ``i+1`` overlap with the compute of block ``i``; the
  exposed time per block is ``max(0, copy - compute)``, plus the first block of each pass.
* all modes: gradients stream to the host during backward (sharing the link with the backward
  weight fetches: both directions at once, bounded by ``duplex_gbps``). A step's first gradient of each
  parameter leaves upcast to fp32 (4 bytes: it lands in the host buffer with no fold), later micro-batches'
  in the compute dtype.
* ``all``: a CPU-stepped block's first fetch after its step sends the fp32 master and writes the
  compute-dtype cast back (the engine casts on the GPU, not the host). With these two the predicted bytes
  match the engine's counters within 1-2% (GPT-2 1.3B and 2.7B on the H200).
* ``optimizer`` / ``all``: the optimizer step runs on the CPU (``cpu_adam_params_per_s``) after the
  last micro-batch, except for the ``gpu_step_fraction`` of the parameters stepped on the GPU (priced
  as in ``params``, concurrently); ``rest_params`` (embeddings, heads) step on the CPU first, in
  every mode, on the step worker while the GPU steps run (the engine queues those first): the step after
  backward takes ``max(GPU steps, rest + CPU blocks)``; in ``optimizer`` mode the updated weights go back to
  the GPU block by block, overlapped with the CPU step of the next block (exposed: one block's copy).
* all modes: the engine's host work per block and micro-batch (fences, gradient hooks, device sums:
  ``block_host_time``) hides behind the block's GPU work only when that is longer: many micro-batches
  of one sample pay it (GPT-2 1.3B on an H200: 8 micro-batches of 1 ran 906 ms, one of 8 733 ms).
* ``params``: optimizer state stays on the GPU; the step streams fp32 master + gradient in and the
  master and its compute-dtype shadow out, block by block on the compute stream (``12`` bytes per
  parameter plus the shadow, serial with each other and with the GPU Adam math).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

MODES = ("none", "optimizer", "params", "all")

#: Bytes of optimizer state per parameter for optimizers the engine knows (fp32 state).
OPTIM_STATE_BYTES_PER_PARAM = {
    "Adam": 8, "AdamW": 8, "Adamax": 8, "NAdam": 8, "RAdam": 8, "Adadelta": 8,
    "SGD": 4, "RMSprop": 4, "Adagrad": 4, "Adafactor": 1,
}


@dataclass
class OffloadCost:
    """What offload costs one optimizer step (all fields in seconds or bytes)."""

    mode: str
    h2d_bytes: float          #: host -> GPU bytes per optimizer step
    d2h_bytes: float          #: GPU -> host bytes per optimizer step
    copy_time: float          #: time the link is busy per step
    exposed_copy_time: float  #: copy time not hidden behind compute
    optimizer_time: float     #: CPU (or streamed GPU) optimizer step time
    extra_step_time: float    #: predicted step time minus the step time without offload
    step_time: float          #: predicted step time with offload
    hidden_fraction: float    #: share of copy time hidden behind compute (1.0 when nothing is copied)

    def to_dict(self) -> dict:
        return asdict(self)


def offload_cost(param_bytes: float, grad_bytes: float, optim_bytes: float, fwd_time: float, bwd_time: float,
                 link_gbps: float, cpu_adam_params_per_s: float, *, mode: str = "all", num_blocks: int = 1,
                 prefetch_blocks: int = 2, microbatches: int = 1, compute_itemsize: int = 2,
                 duplex_gbps: Optional[float] = None, recompute: bool = False,
                 gpu_optim_params_per_s: float = 50e9, no_offload_optim_time: float = 0.0,
                 gpu_step_fraction: float = 0.0, rest_params: float = 0.0, device_accumulate: bool = False,
                 host_fold_params_per_s: float = 4.0e9, device_grads: bool = False,
                 block_host_time: float = 0.0, engine_blocks: Optional[int] = None,
                 stream_step_fraction: float = 0.0, step_in_backward: bool = False,
                 gpu_step_rest: bool = False, param_overhead_s: float = 0.0,
                 cpu_adam_idle_params_per_s: Optional[float] = None) -> OffloadCost:
    """Predict the time one optimizer step spends on offload, and how much of it hides behind compute.

    Args:
        param_bytes: fp32 master bytes of the parameters handled (4 per parameter).
        grad_bytes: gradient bytes leaving the GPU per micro-batch (compute dtype).
        optim_bytes: optimizer state bytes (used for the streamed GPU step of ``params`` mode).
        fwd_time, bwd_time: GPU compute seconds per micro-batch (bwd without recompute).
        link_gbps: one-direction host<->GPU bandwidth in GB/s (10**9 bytes per second).
        cpu_adam_params_per_s: CPU optimizer throughput (parameters per second), 4e9 for fused AdamW
            on 16 cores of an H200 host.
        mode: ``none`` | ``optimizer`` | ``params`` | ``all``.
        num_blocks: offloaded blocks (transformer layers) the parameters are spread over.
        prefetch_blocks: blocks fetched ahead (the engine keeps ``prefetch_blocks + 1`` resident).
        microbatches: micro-batches per optimizer step (gradient accumulation).
        compute_itemsize: bytes per element of the GPU working copies (2 for bf16, 4 for fp32).
        duplex_gbps: bandwidth with both directions busy; default ``1.4 * link_gbps`` (an H200: 75 GB/s against 53-55 one way).
        recompute: activation recompute (the block's forward runs again in backward; weights are
            fetched once for both).
        gpu_optim_params_per_s: GPU optimizer throughput for ``params`` mode's streamed step.
        no_offload_optim_time: the step time of the optimizer without offload (GPU fused AdamW), which
            offload replaces; subtracted from ``extra_step_time``.
        gpu_step_fraction: ``optimizer``/``all``: the share of the parameters whose blocks keep their state
            on the GPU and step there (the engine's hybrid step, ``gpu_step_blocks``): priced like
            ``params`` mode's step, on the compute stream while the CPU steps the rest.
        rest_params: parameters outside the repeated layers (embeddings, heads), counted in
            ``param_bytes``: the engine keeps them resident and steps them on the CPU, synchronously,
            before the layers' steps start (GPT-2 1.3B's 103M embedding: 61 ms on an H200 host).
        device_accumulate: with several micro-batches, gradients are summed on the GPU and leave once per
            step (the engine's ``device_accumulate``); otherwise every micro-batch's gradients go to the
            host and each after the first is added there by the engine's single worker.
        host_fold_params_per_s: that worker's adds (bf16 staging into fp32 buffers), parameters/s:
            4e9 on an H200 host (GPT-2 1.3B, 4 micro-batches: 1.0 s of folds per step), overlapped with the
            backward passes that follow.
        device_grads: GPU-stepped layers keep their gradients on the GPU (the engine's ``device_grads``):
            their gradients neither leave nor come back for the step.
        block_host_time: host seconds the engine spends per block per micro-batch (fences, hooks, device
            sums); the part longer than the block's GPU work is exposed, so many small micro-batches cost
            more than a few large ones (H200 host: 2.8 ms).
        engine_blocks: the engine's blocks (transformer layers) for ``block_host_time``, when ``num_blocks``
            counts finer pieces (the planner's coarsened blocks); default ``num_blocks``.
        stream_step_fraction: ``optimizer``/``all``: the share of the CPU-side layers whose step runs on the GPU
            with their optimizer state streamed in and out (the engine's ``stream_step_blocks``, see
            :func:`choose_stream_step_blocks`).
        step_in_backward: ``optimizer``/``all``: each block steps as its last gradient arrives in backward (the
            engine's ``step_in_backward``; needs one micro-batch or ``device_accumulate``). GPU-stepped layers'
            gradients stay on the GPU and their step pipe shares backward's idle link time; the CPU steps the
            last layers (whose gradients come first) while backward and the next forward's GPU-stepped layers
            run, so only what is left of it by the time that forward reaches them is exposed.
        gpu_step_rest: ``optimizer``/``all``: the rest group (``rest_params``) keeps its master, state and gradients
            on the GPU and steps there (the engine's ``gpu_step_rest``): its gradients stay, its step takes
            ``rest_params / gpu_optim_params_per_s`` and its new weights need no copy in.
        param_overhead_s: GPU time the engine adds per parameter and optimizer step beyond what the terms above
            price (its side-stream casts, GPU steps and norms slowing the compute kernels, allocator stalls near
            the cap): a fitted constant, see :attr:`~rannc_hf.profile.devices.DeviceProfile.offload_param_overhead_s`.
        cpu_adam_idle_params_per_s: with ``step_in_backward``, the CPU step's rate for what is left once the GPU
            work is over (nothing else on the host's memory bus); None: ``cpu_adam_params_per_s`` throughout.

    Returns:
        :class:`OffloadCost`. ``step_time = microbatches * (fwd + bwd [+ fwd if recompute]) + exposed
        copies + optimizer``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bw = float(link_gbps) * 1e9
    duplex = (duplex_gbps * 1e9) if duplex_gbps else 1.4 * bw
    nb = max(1, int(num_blocks))
    mb = max(1, int(microbatches))
    n_params = param_bytes / 4.0
    bwd_eff = bwd_time + (fwd_time if recompute else 0.0)
    compute = mb * (fwd_time + bwd_eff)
    if mode == "none":
        return OffloadCost(mode, 0.0, 0.0, 0.0, 0.0, no_offload_optim_time, 0.0, compute + no_offload_optim_time, 1.0)

    w_bytes = n_params * compute_itemsize          # working copy of all blocks
    per_block_w = w_bytes / nb
    rest = min(n_params, max(0.0, float(rest_params)))
    layers = n_params - rest
    on_gpu = layers if mode == "params" else layers * min(1.0, max(0.0, float(gpu_step_fraction)))
    early = bool(step_in_backward) and mode in ("optimizer", "all") and (mb == 1 or device_accumulate)
    device_grads = device_grads or early
    rest_on_gpu = bool(gpu_step_rest) and mode in ("optimizer", "all")
    stays = (on_gpu if device_grads else 0.0) + (rest if rest_on_gpu else 0.0)
    if stays > 0 and n_params > 0:   # only the CPU-stepped share's gradients travel
        grad_bytes = grad_bytes * (1.0 - stays / n_params)
    per_block_g = grad_bytes / nb
    fwd_b, bwd_b = fwd_time / nb, bwd_eff / nb
    kept = min(nb, prefetch_blocks + 1)

    def backward_link(block_g: float) -> float:
        """Seconds the link is busy during one micro-batch's backward (weight fetches in, gradients out)."""
        b_d2h = block_g / bw
        if mode in ("params", "all"):
            n_fetch = nb - kept
            return n_fetch * max(per_block_w / bw, b_d2h, (per_block_w + block_g) / duplex) + kept * b_d2h
        return nb * b_d2h

    def microbatch_traffic(block_g: float) -> tuple[float, float, float, float]:
        """(h2d, d2h, link busy, exposed) of one micro-batch whose blocks each send ``block_g`` gradient bytes."""
        if mode in ("params", "all"):
            f_copy = per_block_w / bw
            # forward: first block exposed, then each copy overlaps the previous block's compute
            exposed_f = f_copy + (nb - 1) * max(0.0, f_copy - fwd_b)
            # backward: weight fetch (h2d) and gradient stream (d2h) share the link in both directions
            n_fetch = nb - kept
            b_d2h = block_g / bw
            b_copy = max(per_block_w / bw, b_d2h, (per_block_w + block_g) / duplex)
            exposed_b = n_fetch * max(0.0, b_copy - bwd_b) + kept * max(0.0, b_d2h - bwd_b)
            return (w_bytes + per_block_w * n_fetch, block_g * nb, nb * f_copy + n_fetch * b_copy + kept * b_d2h,
                    exposed_f + exposed_b)
        b_d2h = block_g / bw  # optimizer: weights resident, only gradients leave
        return 0.0, block_g * nb, nb * b_d2h, nb * max(0.0, b_d2h - bwd_b)

    # --- per micro-batch traffic (with device accumulation only the last micro-batch's sums leave) ---
    # a step's first gradient of each parameter leaves upcast to fp32 (the engine's direct copy into the host
    # buffer); later micro-batches' go in the compute dtype and are added on the host
    first_g = per_block_g * (4.0 / compute_itemsize if compute_itemsize < 4 else 1.0)
    sending = 1 if (device_accumulate and mb > 1) else mb
    parts = [(microbatch_traffic(first_g), 1)]
    if sending > 1:
        parts.append((microbatch_traffic(per_block_g), sending - 1))
    if sending < mb:
        parts.append((microbatch_traffic(0.0), mb - sending))
    h2d = sum(t[0] * k for t, k in parts)
    d2h = sum(t[1] * k for t, k in parts)
    link_busy = sum(t[2] * k for t, k in parts)
    exposed = sum(t[3] * k for t, k in parts) + first_g / bw  # the last gradient drains after compute
    cpu_side = 0.0 if mode == "params" else (layers - on_gpu) * (1.0 - min(1.0, max(0.0, float(stream_step_fraction))))
    if mode == "all" and compute_itemsize < 4 and cpu_side > 0:
        # a CPU-stepped block's first fetch after its step sends the fp32 master and writes the cast back
        # (store.fill_work): the first micro-batch's forward moves (4 - c) more bytes in and c out per parameter
        w_in = per_block_w + cpu_side * (4.0 - compute_itemsize) / nb
        w_out = cpu_side * compute_itemsize / nb
        f_old, f_new = per_block_w / bw, max(w_in / bw, w_out / bw, (w_in + w_out) / duplex)
        h2d += cpu_side * (4.0 - compute_itemsize)
        d2h += cpu_side * compute_itemsize
        link_busy += nb * (f_new - f_old)
        exposed += nb * (max(0.0, f_new - fwd_b) - max(0.0, f_old - fwd_b))
    exposed += n_params * max(0.0, float(param_overhead_s))
    eb = max(1, int(engine_blocks or nb))  # host-bound small blocks
    exposed += mb * eb * max(0.0, float(block_host_time) - (fwd_time + bwd_eff) / eb)
    if sending > 1:  # host folds of micro-batches 2..m on one worker, overlapped with the backward passes after
        folds = (sending - 1) * (layers - (on_gpu if device_grads else 0.0)) / host_fold_params_per_s
        exposed += max(0.0, folds - (sending - 1) * bwd_eff)

    # --- optimizer step ---
    # GPU steps (``params``, the GPU-stepped share and the streamed share of the others), block by block off
    # the compute stream (engine._device_step_async): inputs on one stream, results back on another
    streamed = 0.0 if mode == "params" else (layers - on_gpu) * min(1.0, max(0.0, float(stream_step_fraction)))
    state_pp = optim_bytes / n_params if n_params > 0 else 8.0

    def pipe(on_g: float, st: float) -> tuple[float, float, float]:
        return gpu_step_pipe(on_g, st, device_grads=device_grads, compute_itemsize=compute_itemsize,
                             state_bytes_per_param=state_pp, link_bps=bw, duplex_bps=duplex,
                             gpu_optim_params_per_s=gpu_optim_params_per_s, resident=mode == "optimizer")

    stream_in, stream_out, t_gpu = pipe(on_gpu, streamed)
    h2d += stream_in
    d2h += stream_out
    link_busy += (stream_in + stream_out) / duplex
    # the resident group, after backward: on the main thread's CPU, or a few kernels on the GPU
    t_rest = rest / (gpu_optim_params_per_s if rest_on_gpu else cpu_adam_params_per_s)
    if early:   # GPU steps inside backward's idle link time (streamed blocks still step after it): the GPU-stepped
        # layers are the first ones, so their gradients, and their steps, come in the last on_gpu/layers of backward
        share = on_gpu / layers if layers > 0 else 0.0
        slack = max(0.0, bwd_eff - backward_link(per_block_g)) * share
        t_gpu = max(0.0, pipe(on_gpu, 0.0)[2] - slack) + pipe(0.0, streamed)[2]
    # the engine queues the GPU steps first; meanwhile the worker steps the resident group (the next forward waits
    # for it), then the CPU-stepped blocks (GPT-2 1.3B's recipe: 446 ms a step against 463 with the rest group first)
    if mode in ("optimizer", "all"):  # the CPU steps the other blocks on the worker meanwhile
        on_cpu = layers - on_gpu - streamed
        t_cpu = on_cpu / cpu_adam_params_per_s
        if mode == "optimizer":  # refresh working copies, overlapped block by block with the CPU step
            cpu_w = w_bytes * on_cpu / n_params
            h2d += cpu_w
            link_busy += cpu_w / bw
            t_cpu = max(t_cpu, cpu_w / bw) + per_block_w / bw
        if early and layers > 0:   # from the last layer's gradients until the next forward reaches the first CPU layer
            window = bwd_eff * (1.0 - 1.0 / nb) + t_rest + fwd_time * on_gpu / layers
            if cpu_adam_idle_params_per_s and on_cpu > 0:   # what is left after the window runs uncontended
                left = max(0.0, on_cpu - window * cpu_adam_params_per_s)
                t_cpu = left / cpu_adam_idle_params_per_s
                if mode == "optimizer":
                    t_cpu = max(t_cpu, cpu_w * left / on_cpu / bw) + per_block_w / bw
            else:
                t_cpu = max(0.0, t_cpu - window)
        t_opt = max(t_gpu, t_rest + t_cpu)
    else:
        t_opt = max(t_gpu, t_rest)
    if rest_on_gpu:
        d2h += rest * 4.0                    # its new master back to the host, behind the next forward
    else:
        h2d += rest * compute_itemsize       # its new working copy
    hidden = 1.0 if link_busy <= 0 else max(0.0, min(1.0, 1.0 - exposed / link_busy))
    step = compute + exposed + t_opt
    return OffloadCost(mode, h2d, d2h, link_busy, exposed, t_opt, step - compute - no_offload_optim_time, step, hidden)


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` spread evenly over the list (order kept).

        >>> spread(list(range(8)), 3)
        [2, 5, 7]
    """
    k = len(items)
    n = max(0, min(int(n), k))
    return [x for i, x in enumerate(items) if (i + 1) * n // k > i * n // k] if k else []


def gpu_step_pipe(on_gpu: float, streamed: float, *, device_grads: bool, compute_itemsize: int,
                  state_bytes_per_param: float, link_bps: float, duplex_bps: float,
                  gpu_optim_params_per_s: float = 50e9, resident: bool = False) -> tuple[float, float, float]:
    """(bytes in, bytes out, seconds) of the GPU steps that follow backward: ``on_gpu`` parameters whose state
    stays on the GPU (fp32 master in, plus the gradient unless ``device_grads``; master and compute-dtype
    shadow out, no shadow when the blocks stay ``resident``: ``optimizer`` mode) and ``streamed`` parameters
    whose state crosses both ways too. Inputs and results travel on separate streams, so the link runs both
    directions at once.

        >>> [round(x / 1e9, 1) for x in gpu_step_pipe(1e9, 1e9, device_grads=False, compute_itemsize=2,
        ...                                           state_bytes_per_param=8, link_bps=55e9, duplex_bps=101e9)[:2]]
        [24.0, 20.0]
    """
    shadow = compute_itemsize if compute_itemsize != 4 else 0
    bytes_in = on_gpu * (4.0 if device_grads else 8.0) + streamed * (8.0 + state_bytes_per_param)
    bytes_out = (on_gpu + streamed) * (4.0 + (0 if resident else shadow)) + streamed * state_bytes_per_param
    t = max(bytes_in / link_bps, bytes_out / link_bps, (bytes_in + bytes_out) / duplex_bps)
    return bytes_in, bytes_out, t + (on_gpu + streamed) / gpu_optim_params_per_s


def choose_stream_step_blocks(cpu_block_numels: Sequence[float], on_gpu_params: float, *, device_grads: bool,
                              compute_itemsize: int, state_bytes_per_param: float, link_bps: float,
                              duplex_bps: float, cpu_adam_params_per_s: float,
                              gpu_optim_params_per_s: float = 50e9) -> int:
    """How many of the CPU-side blocks (``cpu_block_numels``, forward order) to step on the GPU with their state
    streamed (the engine spreads them evenly): the count that makes the step after backward shortest, the CPU
    stepping the others while the link carries the GPU steps (``on_gpu_params`` of GPU-stepped blocks first).

        >>> choose_stream_step_blocks([78.6e6] * 16, 1.26e9, device_grads=False, compute_itemsize=2,
        ...                           state_bytes_per_param=8, link_bps=55e9, duplex_bps=101e9,
        ...                           cpu_adam_params_per_s=2.0e9)
        7
    """
    best, best_t = 0, None
    blocks = list(cpu_block_numels)
    total = float(sum(blocks))
    for n in range(len(blocks) + 1):
        st = float(sum(spread(blocks, n)))
        t_gpu = gpu_step_pipe(on_gpu_params, st, device_grads=device_grads, compute_itemsize=compute_itemsize,
                              state_bytes_per_param=state_bytes_per_param, link_bps=link_bps, duplex_bps=duplex_bps,
                              gpu_optim_params_per_s=gpu_optim_params_per_s)[2]
        t = max(t_gpu, (total - st) / cpu_adam_params_per_s)
        if best_t is None or t < best_t - 1e-12:
            best, best_t = n, t
    return best


def offload_memory(num_params: float, mode: str, *, compute_itemsize: int = 2, optim_bytes_per_param: float = 8.0,
                   num_blocks: int = 1, prefetch_blocks: int = 2, resident_params: float = 0.0) -> dict:
    """Bytes a mode needs on the GPU and on the host for ``num_params`` block parameters.

    ``resident_params`` are parameters outside the blocks (embeddings, heads): their working copy is
    always on the GPU; their master, gradients and state follow the mode like the blocks'.
    Activations are not included (the planner adds them).

    >>> m = offload_memory(1e9, "all", num_blocks=10, prefetch_blocks=2)
    >>> m["gpu_bytes"] / 1e9, m["host_bytes"] / 1e9
    (0.6, 20.0)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    total = num_params + resident_params
    if mode == "none":  # fp32 master + grad + state on the GPU (working copy is the master in fp32)
        extra_work = total * compute_itemsize if compute_itemsize != 4 else 0.0
        return {"gpu_bytes": total * (8 + optim_bytes_per_param) + extra_work, "host_bytes": 0.0}
    nb = max(1, int(num_blocks))
    window = min(nb, prefetch_blocks + 1) / nb
    work_gpu = resident_params * compute_itemsize + num_params * compute_itemsize * (
        window if mode in ("params", "all") else 1.0)
    # host: fp32 master + fp32 grads + compute-dtype staging (+ shadow in compute dtype when not fp32)
    host = total * (4 + 4 + compute_itemsize + (compute_itemsize if compute_itemsize != 4 else 0))
    gpu = work_gpu
    if mode in ("optimizer", "all"):
        host += total * optim_bytes_per_param
    else:  # params: state on the GPU, plus one block of fp32 master + grad while it steps
        gpu += total * optim_bytes_per_param + 8.0 * num_params / nb
    return {"gpu_bytes": gpu, "host_bytes": host}


def choose_mode(num_params: float, gpu_budget_bytes: float, *, activation_bytes: float = 0.0,
                compute_itemsize: int = 2, optim_bytes_per_param: float = 8.0, num_blocks: int = 1,
                prefetch_blocks: int = 2, resident_params: float = 0.0,
                host_budget_bytes: Optional[float] = None) -> Optional[str]:
    """The lightest mode (``none`` < ``optimizer`` < ``params`` < ``all``) whose GPU bytes fit the budget.

    Returns ``None`` when no mode fits (on the GPU, or on the host when ``host_budget_bytes`` is given).

    >>> choose_mode(1e9, 80e9), choose_mode(1e9, 8e9), choose_mode(1e9, 1e9, num_blocks=10)
    ('none', 'optimizer', 'all')
    """
    for mode in MODES:
        m = offload_memory(num_params, mode, compute_itemsize=compute_itemsize,
                           optim_bytes_per_param=optim_bytes_per_param, num_blocks=num_blocks,
                           prefetch_blocks=prefetch_blocks, resident_params=resident_params)
        if m["gpu_bytes"] + activation_bytes <= gpu_budget_bytes and (
                host_budget_bytes is None or m["host_bytes"] <= host_budget_bytes):
            return mode
    return None


def use_device_accumulation(microbatches: int, num_params: float, headroom_bytes: float,
                            safety: float = 1.0) -> bool:
    """Whether the engine sums a pass's micro-batch gradients on the GPU: several micro-batches, and the fp32
    buffer (4 B per parameter) fits in ``safety * headroom_bytes`` (the runtime and the planner use this rule;
    the planner then counts the sums in the stage's peak, and the headroom is already below the cap by
    ``mem_margin``: GPT-2 2.7B, 64k tokens, 24 GiB: 10.6 GB of sums beside a 11.1 GiB stage, 21.0 GiB peak).

        >>> use_device_accumulation(4, 1e9, 5e9), use_device_accumulation(4, 1e9, 3e9), use_device_accumulation(1, 1e9, 10e9)
        (True, False, False)
    """
    return microbatches > 1 and 4.0 * num_params <= safety * float(headroom_bytes)


def gpu_step_rest_bytes(rest_params: float, state_bytes_per_param: float = 8.0) -> float:
    """GPU bytes the rest group takes when it steps there (the engine's ``gpu_step_rest``): its fp32 master and
    gradients and its optimizer state.

        >>> gpu_step_rest_bytes(131e6) / 1e9   # GPT-2 2.7B's embeddings and final norm, AdamW
        2.096
    """
    return float(rest_params) * (8.0 + state_bytes_per_param)


def choose_gpu_step_rest(rest_params: float, headroom_bytes: float, state_bytes_per_param: float = 8.0,
                         safety: float = 0.8) -> bool:
    """Whether the rest group fits on the GPU to step there: its :func:`gpu_step_rest_bytes` within ``safety`` of
    ``headroom_bytes``. The planner then prices both places (on the GPU it takes room from GPU-stepped blocks,
    :func:`choose_gpu_step_blocks` gets what is left) and the runtime follows the plan.

        >>> choose_gpu_step_rest(131e6, headroom_bytes=3e9), choose_gpu_step_rest(131e6, headroom_bytes=2e9)
        (True, False)
    """
    return rest_params > 0 and gpu_step_rest_bytes(rest_params, state_bytes_per_param) <= safety * float(headroom_bytes)


def choose_gpu_step_blocks(block_numels: Sequence[int], headroom_bytes: float, state_bytes_per_param: float = 8.0,
                           safety: float = 0.8) -> int:
    """How many leading blocks keep their optimizer state on the GPU and step there (the engine's hybrid step),
    within ``safety * headroom_bytes``: each costs its state (AdamW: 8 B/param); one block's fp32 master and
    gradient (8 B/param) pass through the GPU at a time.

        >>> choose_gpu_step_blocks([100] * 10, headroom_bytes=5000)   # 4000 B: 800 transient, 800 per block
        4
    """
    budget = safety * float(headroom_bytes) - 8.0 * max(block_numels, default=0)
    k, used = 0, 0.0
    for n in block_numels:
        used += state_bytes_per_param * n
        if used > budget:
            break
        k += 1
    return k
