"""Per-stage GPU memory model: parameters, gradients, optimizer state, activations, buffers.

    >>> from rannc_hf.planner.memory import in_flight, state_bytes
    >>> in_flight("gpipe", stage=0, num_stages=4, microbatches=8), in_flight("1f1b", 0, 4, 8), in_flight("1f1b", 3, 4, 8)
    (8.0, 4.0, 1.0)
    >>> state_bytes(1e9, "bf16", "none")["total"] / 1e9      # fp32 master + fp32 grads + AdamW + bf16 copy
    18.0

Precision ``bf16``/``fp16`` means autocast mixed precision: fp32 master weights (4 B/param), fp32
gradients (4), AdamW state (8), plus the compute-dtype copy of the weights autocast keeps during a
forward (2). ``fp32``: 16 bytes per parameter. Offload modes move master, gradients and optimizer
state to the host as priced by :mod:`rannc_hf.offload.cost` (the offload engine's own model).

Activations per microbatch are multiplied by the microbatches a stage holds at once: GPipe holds all
``M``; 1F1B holds ``min(M, S - s)`` on stage ``s``; interleaved 1F1B with ``v`` chunks per rank holds
its warm-up depth ``2 (S - r - 1) + (v - 1) S + 1`` chunk-microbatches (``/ v`` in stage units).
With recompute a stage keeps, per in-flight microbatch, the values crossing its checkpoint boundaries,
plus one segment's full activations while it recomputes (:mod:`rannc_hf.planner.recompute` picks the
boundaries; the runtime checkpoints the same segments).
"""

from __future__ import annotations

OPTIM_BYTES_PER_PARAM = 8.0
DDP_BUCKET_BYTES = 25 * 2**20


def compute_itemsize(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def in_flight(schedule: str, stage: int, num_stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Microbatches whose activations stage ``stage`` (a rank, for interleaved) holds at its peak."""
    S, M = num_stages, microbatches
    if schedule == "gpipe":
        return float(M)
    if schedule == "interleaved-1f1b" and virtual_stages > 1:
        v = virtual_stages
        warm = 2 * (S - stage - 1) + (v - 1) * S + 1
        return min(M * v, warm) / v
    return float(min(M, S - stage))


def state_bytes(num_params: float, precision: str, offload: str = "none", num_blocks: int = 1,
                prefetch_blocks: int = 2, resident_params: float = 0.0) -> dict[str, float]:
    """GPU and host bytes for the parameters, gradients and optimizer state of ``num_params`` parameters, of which
    ``resident_params`` (offload: the rest group, embeddings and heads) keep their working copy on the GPU while
    the others are spread over ``num_blocks`` offload blocks (the engine's: one per repeated layer)."""
    ci = compute_itemsize(precision)
    resident = min(float(num_params), max(0.0, float(resident_params)))
    try:
        from ..offload.cost import offload_memory
        m = offload_memory(num_params - resident, offload, compute_itemsize=ci,
                           optim_bytes_per_param=OPTIM_BYTES_PER_PARAM, num_blocks=num_blocks,
                           prefetch_blocks=prefetch_blocks, resident_params=resident)
        gpu, host = float(m["gpu_bytes"]), float(m["host_bytes"])
    except ImportError:  # pragma: no cover - the offload package is optional for planning
        gpu, host = _fallback_offload_memory(num_params, offload, ci, num_blocks, prefetch_blocks)
    if offload == "none":
        parts = {"params": num_params * (4 + (ci if ci != 4 else 0)), "grads": num_params * 4.0,
                 "optimizer": num_params * OPTIM_BYTES_PER_PARAM}
    else:
        parts = {"params": gpu, "grads": 0.0, "optimizer": 0.0}
    parts["total"] = gpu
    parts["host"] = host
    return parts


def _fallback_offload_memory(n: float, mode: str, ci: int, nb: int, pf: int) -> tuple[float, float]:
    if mode == "none":
        return n * (16 + (ci if ci != 4 else 0)), 0.0
    window = min(nb, pf + 1) / max(1, nb)
    work = n * ci * (window if mode in ("params", "all") else 1.0)
    host = n * (8 + 2 * ci)
    if mode in ("optimizer", "all"):
        return work, host + n * OPTIM_BYTES_PER_PARAM
    return work + n * OPTIM_BYTES_PER_PARAM + 8.0 * n / max(1, nb), host


def activation_bytes(saved: float, block_inputs: float, max_block_saved: float, inflight: float,
                     recompute: bool) -> float:
    """Activation bytes at the peak: ``inflight`` microbatches' worth, or checkpoints + one segment's worth
    (``block_inputs``: bytes kept at the checkpoint boundaries; ``max_block_saved``: the largest segment)."""
    if recompute:
        return inflight * block_inputs + max_block_saved
    return inflight * saved


def stage_memory(num_params: float, buffer_bytes: float, saved: float, block_inputs: float, max_block_saved: float,
                 peak_out: float, cross_in: float, cross_out: float, inflight: float, precision: str,
                 recompute: bool = False, offload: str = "none", num_blocks: int = 1, prefetch_blocks: int = 2,
                 dp_size: int = 1, resident_params: float = 0.0) -> dict[str, int]:
    """Peak bytes of one stage, broken down the way ``StagePlan.memory`` reports them (``num_blocks``: the
    offload engine's blocks in the stage; ``resident_params``: its rest group, see :func:`state_bytes`)."""
    st = state_bytes(num_params, precision, offload, num_blocks, prefetch_blocks, resident_params)
    acts = activation_bytes(saved, block_inputs, max_block_saved, inflight, recompute)
    comm = 2.0 * (cross_in + cross_out) + (2 * DDP_BUCKET_BYTES if dp_size > 1 else 0)
    work = 2.0 * peak_out  # the largest op's output and its gradient, alive together in backward
    mem = {"params": st["params"], "grads": st["grads"], "optimizer": st["optimizer"], "activations": acts,
           "buffers": buffer_bytes + comm + work}
    mem["total"] = sum(mem.values())
    mem["host"] = st["host"]
    return {k: int(v) for k, v in mem.items()}
