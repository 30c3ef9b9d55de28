"""The offload engine's CPU step of one block on its step worker, alone and beside a thread that runs Python.

    python benchmarks/host_step_gil.py                # writes benchmarks/results/host_step_gil.json
    python benchmarks/host_step_gil.py --repeats 5 --out /tmp/x
    python benchmarks/host_step_gil.py --switch_us 5000,500    # one run per GIL switch interval

The step worker's kernels run without the GIL, but each torch call it makes hands the GIL back and waits to take
it again, up to the interpreter's switch interval (5 ms) while another thread runs Python (the training loop
enqueueing the next forward). The GPT-2 1.3B recipe's CPU-stepped blocks took 67.5 ms each through the accelerate
loop against 28.1 through RanncTrainer on an H200 host (``h200/next67.sh``). This times
``OffloadEngine._step_group`` (what the worker runs per block: clipped, the usual decay / no-decay groups, flat
step) over a GPT-style layer of 12.6M parameters: alone, beside a Python-busy thread (GIL and a core taken),
and beside a busy process (a core taken, no GIL), so the GIL's share is the difference of the last two. Each
run sets the interpreter's switch interval first (the engine lowers it to 0.5 ms while its worker runs:
``rannc_hf/offload/switch_interval.py``; 5 ms is Python's default).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LAYER = [(6144, 512), (6144,), (2048, 512), (2048,), (4096, 512), (512,)] * 2   # 12.6M parameters


def _spin() -> None:
    x = 0
    while True:
        x += 1


def measure(repeats: int, switch_us: int) -> dict:
    import torch

    from rannc_hf.offload.engine import OffloadEngine

    torch.manual_seed(0)
    blocks = [[torch.nn.Parameter(torch.randn(s)) for s in LAYER] for _ in range(2)]
    ps = [p for b in blocks for p in b]
    opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() == 2], "weight_decay": 0.01},
                             {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)
    threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    eng = OffloadEngine(blocks, device="cpu", mode="all", optimizer=opt, async_step=True, cpu_fused=True,
                        cpu_threads=threads, check_memory=False)
    g, inner = eng.blocks[0], eng._inner[0]
    g.grad.normal_()
    has = [True] * len(g.params)
    scale = torch.tensor(0.9)
    pool = eng._pool()
    sys.setswitchinterval(switch_us * 1e-6)   # after _pool(), which lowers it

    def one() -> float:
        t = time.perf_counter()
        eng._step_group(g, inner, has, scale, None)
        return time.perf_counter() - t

    def median_ms() -> float:
        ts = sorted(pool.submit(one).result() for _ in range(repeats))
        return ts[len(ts) // 2] * 1e3

    for _ in range(3):
        pool.submit(one).result()
    res = {"params": g.numel, "step_threads": threads, "switch_us": switch_us, "alone_ms": median_ms()}
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    res["beside_python_thread_ms"] = median_ms()
    stop.set()
    t.join()
    proc = mp.get_context("fork").Process(target=_spin, daemon=True)
    proc.start()
    try:
        res["beside_busy_process_ms"] = median_ms()
    finally:
        proc.terminate()
        proc.join()
    res["gil_share_ms"] = res["beside_python_thread_ms"] - res["beside_busy_process_ms"]
    eng.close(restore=False)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    ap.add_argument("--label", default="current", help="name of this run in the results file")
    ap.add_argument("--switch_us", default="5000,500",
                    help="comma-separated GIL switch intervals in microseconds, one run each (default 5000,500)")
    args = ap.parse_args(argv)
    from benchmarks.common import write_result

    runs = {}
    for us in (int(x) for x in args.switch_us.split(",")):
        res = measure(args.repeats, us)
        print(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
        runs[f"{args.label}, switch {us} us"] = res
    path = write_result("host_step_gil", {"what": "the engine's CPU block step beside a Python-busy thread",
                                          "runs": runs}, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
