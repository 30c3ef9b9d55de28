"""Multi-process overhead on CPU: the same model and batch as a 2-stage pipeline (2 processes, gloo) vs one process.

    python benchmarks/cpu_overhead.py                  # writes benchmarks/results/cpu_overhead.json
    python benchmarks/cpu_overhead.py --steps 3        # quicker

Both runs use ``RanncModule`` with the same GPT-2-style model, global batch, microbatches and schedule (1F1B),
fp32, and the machine's cores split evenly between the processes, so the total work is the same; the ratio
shows what pipelining costs where there is nothing to gain (one CPU): point-to-point sends, schedule
bookkeeping, the pipeline bubble. Reported, not targeted (issue 3). Each run is a ``torchrun`` child.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODEL = dict(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=2048)
BATCH, SEQ, MICROBATCHES = 16, 128, 4


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers as tf

    import rannc_hf

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    cfg = tf.GPT2Config(**MODEL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
    batch = {"input_ids": ids, "labels": ids}
    rc = rannc_hf.RanncConfig(num_stages=world, num_microbatches=MICROBATCHES, schedule="1f1b", precision="fp32",
                              compile="false", recompute="none", offload="none")
    m = rannc_hf.RanncModule(model, opt, config=rc, example_batch=batch)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t = time.perf_counter()
        loss = m(**batch)
        loss = loss.loss if hasattr(loss, "loss") else loss
        loss.backward()
        m.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if dist.get_rank() == 0:
        with open(args.worker_out, "w") as f:
            json.dump({"processes": world, "stages": m.num_stages, "microbatches": m.num_microbatches,
                       "threads_per_process": torch.get_num_threads(), "step_s": sorted(times)[len(times) // 2],
                       "tokens_per_s": BATCH * SEQ / (sorted(times)[len(times) // 2]),
                       "loss": float(loss.detach())}, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    rows = []
    for n in (1, 2):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), "--steps", str(args.steps), "--warmup", str(args.warmup), "--worker_out", out]
        env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        t = time.time()
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            row = json.load(f)
        os.unlink(out)
        row["wall_s"] = round(time.time() - t, 1)
        rows.append(row)
        print(row, flush=True)
    one, two = rows
    from benchmarks.common import write_result

    path = write_result("cpu_overhead", {
        "model": {**MODEL, "batch": BATCH, "seq": SEQ}, "runs": rows,
        "pp2_vs_one_process_step_time": two["step_s"] / one["step_s"],
        "note": "same model, global batch, 4 microbatches, 1F1B, fp32; cores split evenly between processes"})
    print(f"pp=2 (2 processes) step {two['step_s'] * 1e3:.1f} ms vs one process {one['step_s'] * 1e3:.1f} ms: "
          f"{two['step_s'] / one['step_s']:.2f}x")
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
