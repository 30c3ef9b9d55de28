"""Which attention kernel does torch.compile pick for BERT's training-mode attention (dropout 0.1, bf16, no mask)?
next57's profile: RanncModule's compiled BERT-large ran fp32 math attention (FFMA GEMMs and _safe_softmax) where
eager ran cuDNN's flash kernels. Each variant: the attention kernels one forward + backward launches, and its time.

    python benchmarks/h200/sdpa_compile.py            # no mask: backends, eager and compiled
    python benchmarks/h200/sdpa_compile.py --masks    # a padding mask as Hugging Face builds it, and other forms
"""
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, S, D = 32, 16, 512, 64


def att(q, k, v, p):
    return F.scaled_dot_product_attention(q, k, v, None, p, scale=0.125)


def att_aten(q, k, v, p):   # as the exported stage graph calls it
    return torch.ops.aten.scaled_dot_product_attention.default(q, k, v, None, p, scale=0.125)


def att_mask(q, k, v, p, mask):
    return F.scaled_dot_product_attention(q, k, v, mask, p, scale=0.125)


def masks():
    """A padding mask (the last eighth of every row padded): bool expanded from [B, 1, 1, S] with stride 0 over the
    queries (Hugging Face's sdpa_mask), the same made contiguous, and additive bf16 forms."""
    keep = torch.ones(B, S, dtype=torch.bool, device="cuda")
    keep[:, -S // 8:] = False
    b = keep[:, None, None, :].expand(B, 1, S, S)
    add = torch.zeros(B, 1, 1, S, dtype=torch.bfloat16, device="cuda").masked_fill(~keep[:, None, None, :], float("-inf"))
    return {"bool expanded": b, "bool contiguous": b.contiguous(), "additive expanded": add.expand(B, 1, S, S),
            "additive contiguous": add.expand(B, 1, S, S).contiguous()}


def run(name, fn, p, ctx=None, mask=None):
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def once():
        if mask is not None:
            o = fn(q, k, v, p, mask)
        elif ctx is None:
            o = fn(q, k, v, p)
        else:
            with sdpa_kernel(ctx):
                o = fn(q, k, v, p)
        o.float().sum().backward()

    try:
        for _ in range(3):
            once()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            once()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 10
        torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        names = sorted({e.name[:70] for e in prof.events() if re.search("flash|fmha|cudnn|sdpa|attention|xmma_gemm_f32|softmax|efficient", e.name, re.I)})
        print(f"{name:40s} {dt * 1e3:7.2f} ms  peak {torch.cuda.max_memory_allocated() / 2**30:5.2f} GiB  {names}", flush=True)
    except Exception as e:  # noqa: BLE001 - a report of what fails
        print(f"{name:40s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


print(torch.__version__, torch.cuda.get_device_name())
if "--masks" in sys.argv:
    for name, m in masks().items():
        run(f"eager p=0.1 {name}", att_mask, 0.1, mask=m)
        run(f"compile p=0.1 {name}", torch.compile(att_mask), 0.1, mask=m)
        torch._dynamo.reset()
    sys.exit(0)
run("eager p=0.1", att, 0.1)
run("compile p=0.1", torch.compile(att), 0.1)
torch._dynamo.reset()
run("compile aten p=0.1", torch.compile(att_aten), 0.1)
torch._dynamo.reset()
run("compile p=0.0", torch.compile(att), 0.0)
torch._dynamo.reset()
for backends in ([SDPBackend.CUDNN_ATTENTION], [SDPBackend.FLASH_ATTENTION], [SDPBackend.EFFICIENT_ATTENTION],
                 [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
    run(f"compile p=0.1 {[b.name for b in backends]}", torch.compile(att), 0.1, backends)
    torch._dynamo.reset()
    run(f"eager p=0.1 {[b.name for b in backends]}", att, 0.1, backends)
