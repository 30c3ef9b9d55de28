"""Measure a device profile on this machine: GEMM FLOP/s, memory bandwidth, host<->GPU copy bandwidth.

    >>> from rannc_hf.profile.calibrate import calibrate
    >>> p = calibrate(quick=True)            # doctest: +SKIP
    >>> p.save("my_gpu.json")                # then: rannc-hf plan ... --device my_gpu.json   # doctest: +SKIP

On a CPU-only machine it measures the CPU (fp32/bf16 GEMM, copy bandwidth) and keeps the link
figures of the built-in ``cpu`` profile. ``rannc-hf calibrate --out profile.json`` runs this.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .devices import DeviceProfile, get_profile


def _bench(fn: Callable[[], None], sync: Callable[[], None], min_time: float = 0.2, max_iters: int = 50) -> float:
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (time.perf_counter() - t0) < min_time or n < 2:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def calibrate(quick: bool = False) -> DeviceProfile:
    """Measure this machine's first CUDA GPU (or its CPU) and return a :class:`DeviceProfile`."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prof = get_profile("auto")
    if cuda:
        prof.name = torch.cuda.get_device_name(0)
        prof.memory = int(torch.cuda.get_device_properties(0).total_memory)
    n = (1024 if quick else 4096) if cuda else (256 if quick else 1024)
    flops = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if not cuda and key == "fp16":
            continue
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        t = _bench(lambda: torch.mm(a, b), sync)
        flops[key] = 2.0 * n ** 3 / t
    prof.flops = flops
    m = (64 if quick else 512) * 2**20 // 4 if cuda else (16 if quick else 64) * 2**20 // 4
    x = torch.empty(m, device=dev)
    y = torch.empty(m, device=dev)
    t = _bench(lambda: y.copy_(x), sync)
    prof.mem_bw = 2.0 * x.numel() * 4 / t
    if cuda:
        h = torch.empty(m, pin_memory=True)
        g = torch.empty(m, device=dev)
        prof.h2d_bw = x.numel() * 4 / _bench(lambda: g.copy_(h, non_blocking=True), sync)
        prof.d2h_bw = x.numel() * 4 / _bench(lambda: h.copy_(g, non_blocking=True), sync)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        h2 = torch.empty(m, pin_memory=True)
        g2 = torch.empty(m, device=dev)

        def both():
            with torch.cuda.stream(s1):
                g.copy_(h, non_blocking=True)
            with torch.cuda.stream(s2):
                h2.copy_(g2, non_blocking=True)

        prof.duplex_bw = 2 * x.numel() * 4 / _bench(both, sync)
    prof.gemm_efficiency = 1.0
    prof.notes = f"measured by rannc-hf calibrate (torch {torch.__version__}, GEMM n={n})"
    return prof
