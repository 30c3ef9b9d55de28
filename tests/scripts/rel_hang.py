"""Hang worker: rank 1 goes to sleep forever before a pipeline step; rank 0 must fail fast and clearly.

    torchrun --standalone --nproc_per_node 2 tests/scripts/rel_hang.py TIMEOUT_S

A 4-layer MLP over 2 pipeline stages (RanncModule, ``collective_timeout_s=TIMEOUT_S``, forward guarded by
``rannc_hf.reliability.guard_module``). One step runs on both ranks; then rank 1 sleeps and rank 0 runs
the next step, whose receive from rank 1 times out. Rank 0 prints ``HANG_DETECTED_AFTER <seconds>`` and
the error, and exits 3; torchrun then stops rank 1.
"""

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

torch.set_num_threads(1)
import rannc_hf  # noqa: E402
from rannc_hf.reliability import CollectiveTimeoutError, guard_module  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x, y):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return ((x - y) ** 2).mean()


def main():
    timeout = float(sys.argv[1])
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {"x": torch.randn(4, 16), "y": torch.randn(4, 16)}
    cfg = rannc_hf.RanncConfig(num_stages=2, num_microbatches=2, schedule="gpipe", precision="fp32",
                               partitioner="even", collective_timeout_s=timeout)
    rm = guard_module(rannc_hf.RanncModule(model, opt, config=cfg, example_batch=batch))
    rm(**batch).backward()
    opt.step()
    rank = torch.distributed.get_rank()
    if rank == 1:
        print("rank 1: sleeping forever before the next step", flush=True)
        time.sleep(3600)
    t0 = time.time()
    try:
        rm(**batch).backward()
    except CollectiveTimeoutError as e:
        print(f"HANG_DETECTED_AFTER {time.time() - t0:.1f}", flush=True)
        print(f"{type(e).__name__}: {e}", flush=True)
        sys.exit(3)
    print("NO_ERROR", flush=True)


if __name__ == "__main__":
    main()
