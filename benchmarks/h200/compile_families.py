"""Every zoo family through RanncModule on one GPU, bf16, compiled and eager: the same losses step for step (bf16
rounding apart), and which path ran (fast path, or the captured graph for a compiled encoder).

    python benchmarks/h200/compile_families.py            # all families
    python benchmarks/h200/compile_families.py bert t5
"""
import sys
import time

import torch

import rannc_hf
from rannc_hf.zoo import FAMILIES, loss_of, make_with_batches

STEPS, BATCH = 4, 8


def train(fam: str, compile_mode: str):
    torch.manual_seed(0)
    model, bf = make_with_batches(fam, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rm = rannc_hf.RanncModule(model, opt, config=rannc_hf.RanncConfig(num_stages=1, precision="bf16",
                                                                      compile=compile_mode))
    losses, t0 = [], time.perf_counter()
    for step in range(STEPS):
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in bf(BATCH, step).items()}
        loss = loss_of(rm(**batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, time.perf_counter() - t0, ("fast path" if rm._fast else "captured graph"), rm.compile_enabled


ok = True
for fam in sys.argv[1:] or FAMILIES:
    try:
        le, te, pe, _ = train(fam, "false")
        lc, tc, pc, on = train(fam, "auto")
        diff = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(le, lc))
        good = diff < 0.05
        ok &= good
        print(f"{fam:9s} {'OK ' if good else 'BAD'} compiled={on} ({pc}) eager ({pe}) max rel loss diff {diff:.2e} "
              f"eager {[round(x, 4) for x in le]} compiled {[round(x, 4) for x in lc]} ({te:.1f} s / {tc:.1f} s)", flush=True)
    except Exception as e:  # noqa: BLE001 - reported, the next family runs
        ok = False
        print(f"{fam:9s} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    torch._dynamo.reset()
print("ALL OK" if ok else "SOME FAILED")
