"""Device cost profiles: peak FLOP/s, memory and link bandwidths of one GPU (or the local CPU).

    >>> from rannc_hf.profile.devices import get_profile
    >>> p = get_profile("h200")
    >>> p.flops["bf16"] / 1e12, p.h2d_bw / 1e9
    (790.0, 55.0)
    >>> get_profile("h200").to_dict() == DeviceProfile.from_dict(p.to_dict()).to_dict()
    True

``get_profile`` accepts a built-in name (``h100``, ``h200``, ``a100``, ``cpu``), ``"auto"`` (the
local CUDA device if any, else ``cpu``) or the path of a JSON file written by ``rannc-hf calibrate``
or by hand (same keys as :meth:`DeviceProfile.to_dict`). All rates are in bytes or FLOPs per second.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError


@dataclass
class DeviceProfile:
    """What one accelerator (and the links around it) can do; the analytic cost model reads only this."""

    name: str
    flops: dict[str, float] = field(default_factory=dict)  #: dense GEMM FLOP/s by precision (fp32, bf16, fp16)
    mem_bw: float = 1e12             #: device memory bandwidth, bytes/s
    memory: int = 80 * 2**30         #: device memory, bytes
    h2d_bw: float = 25e9             #: pinned host->device, bytes/s (one direction)
    d2h_bw: float = 25e9             #: pinned device->host, bytes/s
    duplex_bw: float = 46e9          #: both directions at once, bytes/s
    intra_node_bw: float = 300e9     #: GPU<->GPU within a node (NVLink), bytes/s per direction
    inter_node_bw: float = 50e9      #: network bandwidth per node (InfiniBand), bytes/s, shared by its GPUs
    p2p_latency: float = 10e-6       #: seconds per point-to-point message
    collective_latency: float = 20e-6  #: seconds per all-reduce step
    gemm_efficiency: float = 1.0     #: fraction of ``flops`` large GEMMs reach (1.0: ``flops`` is measured GEMM)
    attention_efficiency: float = 0.6  #: fraction of GEMM FLOP/s fused attention reaches
    #: fused attention reaches ``attention_efficiency`` at this head dimension and proportionally less below it
    #: (the softmax's share of the work grows as the head narrows); 0: no dependence on the head dimension
    attention_head_dim: int = 0
    bw_efficiency: float = 0.8       #: fraction of ``mem_bw`` elementwise kernels reach
    op_overhead: float = 4e-6        #: launch/dispatch seconds per kernel
    cpu_adam_params_per_s: float = 4.0e9  #: host optimizer throughput (fused AdamW), parameters/s
    host_fold_params_per_s: float = 4.0e9  #: offload: host adds of micro-batch gradients (one worker), parameters/s
    #: host optimizer throughput once the GPU work of the step is over (no gradient copies or next forward beside
    #: it); None: ``cpu_adam_params_per_s``
    cpu_adam_idle_params_per_s: Optional[float] = None
    #: offload: host (Python) seconds the engine spends on one block in one micro-batch's forward and backward
    #: (residency fences, gradient hooks, device sums); exposed when the block's GPU work is shorter. Fitted on
    #: GPT-2 1.3B under 24 GiB on an H200 at 8 micro-batches of 1: 2.8 ms made 906 ms of the fifth session
    #: (benchmarks/h200/next5.sh); the thirteenth's code ran it in 711 ms (next53.sh), which 2.2 ms prices at +9%
    #: while keeping GPT-2 2.7B's 64k-token run at -5% (2.5 ms: +17% and +4%; cost_check.py)
    offload_block_host_s: float = 2.2e-3
    #: host seconds per kernel an eager step launches, forward or backward (Python, dispatcher, autograd, autocast,
    #: launch): a micro-batch whose kernels are shorter waits on the host. 0: never host-bound
    host_launch_s: float = 0.0
    #: offload: GPU seconds the engine adds per offloaded parameter and optimizer step beyond the copies and steps
    #: the cost model prices (side-stream casts, GPU steps and norms slowing the compute kernels, allocator stalls
    #: near the cap). Fitted on seven H200 runs of GPT-2 1.3B and 2.7B under 24 GiB (step in and after backward,
    #: one and eight micro-batches; docs/offload.md, "Cost model"): the value that makes the largest error smallest
    offload_param_overhead_s: float = 5.5e-11
    notes: str = ""

    def peak_flops(self, precision: str) -> float:
        """GEMM FLOP/s at ``precision``. fp32 is the TF32 tensor-core rate (``flops["fp32"]``) only when torch
        lets fp32 matmuls use TF32 (``torch.set_float32_matmul_precision("high")``); at torch's default
        ("highest") it is the IEEE rate, ``flops["fp32_ieee"]`` where the profile has one (GPT-2 2.7B in fp32
        on two H200s: 3.73 s measured, 0.72 s priced at the TF32 rate)."""
        if precision == "fp32" and "fp32_ieee" in self.flops and not _tf32_matmuls():
            return float(self.flops["fp32_ieee"])
        if precision in self.flops:
            return float(self.flops[precision])
        if precision == "fp16" and "bf16" in self.flops:
            return float(self.flops["bf16"])
        return float(self.flops.get("fp32", 1e12))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceProfile":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ConfigError(f"device profile: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
        if "name" not in d:
            raise ConfigError("device profile: missing 'name'")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeviceProfile":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"device profile file {os.fspath(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"device profile file {os.fspath(path)!r} is not valid JSON: {e}") from None


def _tf32_matmuls() -> bool:
    import torch

    return torch.get_float32_matmul_precision() != "highest"


def _h200() -> DeviceProfile:
    return DeviceProfile(
        name="h200", flops={"bf16": 790e12, "fp16": 790e12, "fp32": 395e12, "fp32_ieee": 60e12},
        mem_bw=4.8e12, memory=141 * 10**9,
        # large GEMMs reach 790 TFLOP/s, a model's mix of GEMM shapes less: 0.8 makes the analytic step of eager
        # plain PyTorch match its measured one (GPT-2 1.3B micro-batch 16: 437 ms predicted, 432 measured; GPT-2
        # 2.7B micro-batch 8: 415 against 417; at 1.0: 391 and 368)
        gemm_efficiency=0.8,
        # pinned copies of 315 MB, sixth 2026-11-30 session (benchmarks/h200/rates.py): 53 GB/s in, 55 out, 75 both
        # ways at once
        h2d_bw=55e9, d2h_bw=55e9, duplex_bw=75e9, intra_node_bw=450e9, inter_node_bw=50e9,
        # the fused CPU AdamW kernel alone runs 4.0e9 params/s on 16 cores (DESIGN.md section 7); inside the
        # engine, beside the gradient copies and the next forward, GPT-2 2.7B's 14 and 17 CPU-stepped layers
        # stepped at 2.48e9 params/s (eighth session, step_in_backward; 2.0e9 in the sixth, with host folds)
        cpu_adam_params_per_s=2.5e9,
        # ... and alone 4.0e9 (the anchor above); after the last backward of GPT-2 2.7B's 64k-token step (ninth
        # session, benchmarks/h200/next25.sh) its 31 CPU-stepped layers ran at 3.4e9, behind the devices sums' copies
        cpu_adam_idle_params_per_s=4.0e9,
        # GPT-2 1.3B, optimizer offload, 4 micro-batches summed on the host: 1.0 s of worker folds per step
        host_fold_params_per_s=4.0e9,
        # eager micro-batches of GPT-2 1.3B's and BERT-large's 24-layer structure at width 64 (no GPU work to
        # speak of) took 67 and 64 ms of host time each through RanncModule, 57 and 59 through plain PyTorch
        # (eleventh session, benchmarks/host_dispatch.py): 73 us per kernel counted as host_times() counts them
        # fits both within 9%. GPT-2 1.3B in 8 micro-batches of 2 ran 668 ms a step, 495 priced without it
        host_launch_s=73e-6,
        # BERT-large (head dim 64, seq 512, batch 32, padded) under torch.profiler (sixteenth session, next62): the
        # cuDNN attention kernels ran 110 TFLOP/s forward and 167 backward (2.5x), 19.6 ms a step where head-dim-
        # independent pricing gave 7.6: the recipe's step was predicted 74.6 ms and ran 92.3. GPT-2 1.3B (head dim
        # 128) keeps its pricing
        attention_head_dim=128,
        notes="bf16 GEMM and pinned copies measured on one H200 (DESIGN.md section 7); fp32 = TF32 tensor cores "
              "(fp32_ieee: torch's default matmul precision, 67 TFLOP/s datasheet at 90%); CPU AdamW rate as "
              "measured inside the offload engine")


def _h100() -> DeviceProfile:
    return DeviceProfile(
        name="h100", flops={"bf16": 720e12, "fp16": 720e12, "fp32": 360e12, "fp32_ieee": 60e12},
        mem_bw=3.35e12, memory=80 * 2**30,
        h2d_bw=55e9, d2h_bw=55e9, duplex_bw=101e9, intra_node_bw=450e9, inter_node_bw=50e9,
        host_launch_s=73e-6,   # assumed: the H200 box's host
        attention_head_dim=128,  # as the H200 (the same Hopper attention kernels)
        notes="H100 SXM, scaled from the H200 measurement by datasheet ratios")


def _a100() -> DeviceProfile:
    return DeviceProfile(
        name="a100", flops={"bf16": 280e12, "fp16": 280e12, "fp32": 140e12, "fp32_ieee": 18e12},
        mem_bw=2.0e12, memory=80 * 2**30,
        h2d_bw=25e9, d2h_bw=25e9, duplex_bw=45e9, intra_node_bw=300e9, inter_node_bw=25e9,
        host_launch_s=73e-6,   # assumed: the H200 box's host
        notes="A100 SXM 80GB, ~90% of datasheet GEMM peak, PCIe Gen4")


def _cpu() -> DeviceProfile:
    """The local CPU as a (slow) device: rough defaults; ``rannc-hf calibrate`` measures real ones."""
    try:
        import psutil
        mem = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001
        mem = 16 * 2**30
    cores = os.cpu_count() or 1
    return DeviceProfile(
        name="cpu", flops={"fp32": 50e9 * cores, "bf16": 25e9 * cores, "fp16": 10e9 * cores}, mem_bw=10e9 * min(cores, 8),
        memory=mem, h2d_bw=20e9, d2h_bw=20e9, duplex_bw=20e9, intra_node_bw=10e9, inter_node_bw=1e9,
        p2p_latency=50e-6, collective_latency=100e-6, attention_efficiency=0.5, bw_efficiency=0.7, op_overhead=10e-6,
        cpu_adam_params_per_s=0.25e9 * cores, host_fold_params_per_s=0.5e9 * cores, offload_block_host_s=0.0,
        notes="generic local CPU defaults (gloo)")


BUILTIN = {"h200": _h200, "h100": _h100, "a100": _a100, "cpu": _cpu}


def list_profiles() -> list[str]:
    return sorted(BUILTIN)


def local_device_name() -> str:
    """``h100``/``h200``/``a100`` when the local CUDA GPU is one of them, ``cuda`` for another GPU, else ``cpu``."""
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            for key in ("h200", "h100", "a100"):
                if key in name:
                    return key
            return "cuda"
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def get_profile(name: Optional[str | DeviceProfile] = "auto") -> DeviceProfile:
    """A built-in profile by name, ``"auto"`` for the local device, or a JSON file path."""
    if isinstance(name, DeviceProfile):
        return name
    key = (name or "auto").strip()
    if key.lower().endswith(".json") or os.sep in key:
        return DeviceProfile.load(key)
    low = key.lower()
    if low in ("auto", "local"):
        low = local_device_name()
        if low == "cuda":  # an unknown GPU: start from its memory size and H100-like rates
            import torch
            prof = _h100()
            prof.name = torch.cuda.get_device_name(0)
            prof.memory = int(torch.cuda.get_device_properties(0).total_memory)
            prof.notes = "unknown GPU: H100-like rates; run `rannc-hf calibrate` for real ones"
            return prof
    if low not in BUILTIN:
        raise ConfigError(f"unknown device profile {name!r}; choose one of {', '.join(list_profiles())}, 'auto', "
                          f"or the path of a JSON profile (see `rannc-hf calibrate`)")
    return BUILTIN[low]()
