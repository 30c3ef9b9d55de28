"""How fast does the planner plan? GPT-style 100B on 1024 x 80 GB GPUs (target < 60 s incl. capture), 13B on 8 x H200.

    python benchmarks/plan_speed.py            # writes benchmarks/results/plan_speed.json

Models are built on the meta device (no memory). Wall time covers capture (at a proxy batch and
again at the chosen microbatch size) plus the whole search, on this machine's CPU.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import rannc_hf  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

CASES = [
    # name, hidden, layers, heads, seq, global batch, cluster
    ("gpt-100b", 10240, 80, 80, 2048, 1536, dict(num_gpus=1024, gpus_per_node=8, gpu_memory="80GB", device="h100")),
    ("gpt-13b", 5120, 40, 40, 2048, 64, dict(num_gpus=8, gpus_per_node=8, gpu_memory="141GB", device="h200")),
]


def gpt(hidden: int, layers: int, heads: int, seq: int, batch: int):
    cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq, vocab_size=50257,
                        use_cache=False)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    return model, {"input_ids": ids, "labels": ids}


def main() -> None:
    rows = []
    for name, h, L, heads, seq, B, cl in CASES:
        model, batch = gpt(h, L, heads, seq, B)
        t = time.perf_counter()
        p = rannc_hf.plan(model, batch, cluster=rannc_hf.Cluster(**cl), progress=False)
        wall = time.perf_counter() - t
        peak = max(s.peak_bytes for s in p.stages)
        rows.append({"case": name, "params_b": round(sum(s.num_params for s in p.stages) / 1e9, 2),
                     "cluster": cl, "seq_len": seq, "global_batch": B, "wall_s": round(wall, 2),
                     "target_s": 60, "stages": p.num_ranks_pp, "dp": p.dp_size, "microbatches": p.num_microbatches,
                     "schedule": p.schedule, "virtual_stages": p.virtual_stages,
                     "predicted_step_s": round(p.predicted_step_time, 4), "bubble": round(p.predicted_bubble, 4),
                     "peak_gib": round(peak / 2**30, 2), "cap_gib": round(p.gpu_memory / 2**30, 2),
                     "recompute_stages": sum(s.recompute != "none" for s in p.stages),
                     "offload_stages": sum(s.offload != "none" for s in p.stages)})
        print(f"{name}: {wall:.1f} s, {p.num_ranks_pp} stages x {p.dp_size} dp, M={p.num_microbatches}, "
              f"{p.schedule}, step {p.predicted_step_time:.2f} s")
    print(write_result("plan_speed", {"cases": rows}))


if __name__ == "__main__":
    main()
