"""Plan quality by the simulator: auto vs even (equal layers) vs params (equal parameter bytes).

    python benchmarks/plan_quality.py          # writes benchmarks/results/plan_quality.json
    python benchmarks/plan_quality.py --model llama-vocab250k --mode pipeline   # a subset; prints, writes nothing

GPT-2-style (1.3B), BERT-large-style and a large-vocabulary (250k) decoder over 4, 8 and 64 GPUs
of 80 GB (H100 profile, 8 per node). Every partitioner searches the same stages x replicas x
microbatches x schedule x recompute space and is scored by the same simulator; ``ratio_*`` is the
baseline's predicted step time over auto's (higher = auto better). Targets: auto never worse than
the better baseline; >= 1.2x better than ``params`` on the large-vocabulary model.
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

SEQ = 1024
GLOBAL_BATCH = 512


def models():
    ids = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)   # the global batch; plan() captures a proxy of 2
    with torch.device("meta"):
        gpt = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=2048, n_layer=24, n_head=16, n_positions=SEQ, vocab_size=50257))
        bert = tf.BertForMaskedLM(tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                intermediate_size=4096, max_position_embeddings=SEQ))
        big_vocab = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                                       num_attention_heads=16, num_key_value_heads=16,
                                                       vocab_size=250_000, max_position_embeddings=SEQ,
                                                       tie_word_embeddings=False))
    yield "gpt2-1.3b", gpt, {"input_ids": ids, "labels": ids}
    yield "bert-large", bert, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    yield "llama-vocab250k", big_vocab, {"input_ids": ids, "labels": ids}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="only this model (repeatable); the results file is not written")
    ap.add_argument("--mode", choices=("free", "pipeline"), help="only this mode; the results file is not written")
    ap.add_argument("--gpus", type=int, action="append", help="only this GPU count (repeatable); no results file")
    args = ap.parse_args()
    subset = bool(args.model or args.mode or args.gpus)
    rows = []
    for name, model, batch in models():
        if args.model and name not in args.model:
            continue
        model.config.use_cache = False
        n_params = sum(p.numel() for p in model.parameters())
        for gpus, mode in [(4, "free"), (8, "free"), (64, "free"), (4, "pipeline"), (8, "pipeline"), (64, "pipeline")]:
            if (args.mode and mode != args.mode) or (args.gpus and gpus not in args.gpus):
                continue
            cl = rannc_hf.Cluster(num_gpus=gpus, gpus_per_node=8, gpu_memory="80GB", device="h100")
            # "free": the whole space (a model that fits one GPU gets pure data parallelism, where every
            # partitioner is the same); "pipeline": pipeline depth fixed to min(gpus, 8), so the partition matters
            cfg = rannc_hf.RanncConfig(num_stages=min(gpus, 8)) if mode == "pipeline" else rannc_hf.RanncConfig()
            t = time.perf_counter()
            p = rannc_hf.plan(model, batch, cluster=cl, config=cfg, progress=False)   # capture included
            dt = time.perf_counter() - t
            row = {"model": name, "params_m": round(n_params / 1e6, 1), "gpus": gpus, "mode": mode,
                   "auto_step_s": p.predicted_step_time, "auto_shape": f"{p.num_ranks_pp}pp x {p.dp_size}dp, "
                   f"M={p.num_microbatches}, {p.schedule}" + (f" v={p.virtual_stages}" if p.virtual_stages > 1 else ""),
                   "planning_s": round(dt, 2), "head_split": p.split_min_out_features is not None}
            for base in ("even", "params"):
                bt = p.baselines.get(base)
                row[f"{base}_step_s"] = bt
                row[f"ratio_{base}"] = round(bt / p.predicted_step_time, 3) if bt else None
            best_base = min([v for v in (row["even_step_s"], row["params_step_s"]) if v] or [float("inf")])
            row["auto_not_worse"] = p.predicted_step_time <= best_base * (1 + 1e-9)
            rows.append(row)
            print(row)
    large = [r for r in rows if r["model"] == "llama-vocab250k" and r["ratio_params"] and r["mode"] == "pipeline"]
    summary = {"auto_never_worse": all(r["auto_not_worse"] for r in rows),
               "min_ratio_params_large_vocab_pipeline": min((r["ratio_params"] for r in large), default=None),
               "target_ratio_params_large_vocab": 1.2}
    print(summary)
    if subset:
        return
    print(write_result("plan_quality", {"seq_len": SEQ, "global_batch": GLOBAL_BATCH, "device_profile": "h100",
                                        "gpu_memory": "80GB", "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
