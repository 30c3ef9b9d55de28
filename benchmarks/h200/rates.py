"""Rates that decide how an offloaded optimizer step is split (sixth session): pinned PCIe bandwidth each way and
both at once, CPU fused AdamW over one GPT-2 2.7B layer (78.6M parameters) with and without the fp32 -> bf16
shadow cast, and the GPU AdamW over the same. Prints one JSON line.

    python benchmarks/h200/rates.py
"""
import json
import time

import torch

from benchmarks.common import seconds_per_call
from rannc_hf.offload.store import _empty_host

N = 78_643_200  # one GPT-2 2.7B layer (12 * 2560**2)
res = {"threads": torch.get_num_threads()}


def t(fn, reps=5):
    return seconds_per_call(fn, reps, warmup=1, cuda=True)


h = _empty_host(4 * N, torch.float32, True)
h2 = _empty_host(4 * N, torch.float32, True)
d = torch.empty(4 * N, device="cuda")
d2 = torch.empty(4 * N, device="cuda")
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
gb = h.nbytes / 1e9
res["h2d_gbps"] = gb / t(lambda: d.copy_(h, non_blocking=True))
res["d2h_gbps"] = gb / t(lambda: h.copy_(d, non_blocking=True))


def duplex():
    with torch.cuda.stream(s1):
        d.copy_(h, non_blocking=True)
    with torch.cuda.stream(s2):
        h2.copy_(d2, non_blocking=True)


res["duplex_gbps"] = 2 * gb / t(duplex)
del h, h2, d, d2

p = torch.randn(N)
g = torch.randn(N) * 1e-3
for fused in (True, False):
    opt = torch.optim.AdamW([torch.nn.Parameter(p)], lr=1e-4, fused=fused, foreach=None if fused else True)
    opt.param_groups[0]["params"][0].grad = g
    opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    res[f"cpu_adamw_{'fused' if fused else 'foreach'}_ms"] = (time.perf_counter() - t0) / 3 * 1e3
sh = torch.empty(N, dtype=torch.bfloat16)
t0 = time.perf_counter()
for _ in range(3):
    sh.copy_(p)
res["cpu_cast_bf16_ms"] = (time.perf_counter() - t0) / 3 * 1e3
gs = torch.empty(N, dtype=torch.bfloat16).copy_(g)
t0 = time.perf_counter()
for _ in range(3):
    g.copy_(gs)
res["cpu_fold_ms"] = (time.perf_counter() - t0) / 3 * 1e3

pd = torch.nn.Parameter(p.cuda())
pd.grad = g.cuda()
for kind in ("fused", "foreach"):
    opt = torch.optim.AdamW([pd], lr=1e-4, fused=kind == "fused", foreach=True if kind == "foreach" else None)
    res[f"gpu_adamw_{kind}_ms"] = t(opt.step) * 1e3
res["params"] = N
print(json.dumps(res), flush=True)
