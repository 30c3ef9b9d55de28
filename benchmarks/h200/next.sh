#!/bin/bash
# H200 x2, the next session's first call (~9.5 min): both recipes with offload under 24 GiB, 200 steps (issue 7),
# on GPU 0 one after the other; on GPU 1 the RanncModule offload correctness check on CUDA, then the Trainer's
# offload scenarios, 100 steps (issue 6). call8.sh again, after the fix of the per-call gradient round trip that
# made call 8's offloaded runs 10-15x slow.
source "$(dirname "$0")/lib.sh"
R="--rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10"
( job recipe_gpt 0 0-15 330 python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b $R; wait
  job recipe_bert 0 0-15 $((575 - SECONDS)) env RANNC_HF_OFFLOAD=optimizer python3 recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --output_dir /tmp/recipes/bert-large $R; wait ) &
( job rannc_offload_check 1 16-31 120 python3 benchmarks/offload_gpu_check.py --rannc-only; wait   # CUDA correctness first
  job trainer_offload 1 16-31 $((575 - SECONDS)) python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 100 --warmup 10 --out $OUT/results; wait ) &
wait
for r in gpt-1.3b bert-large; do mkdir -p $OUT/recipes/$r; cp /tmp/recipes/$r/{history.json,rannc_stats.json,loss.png} $OUT/recipes/$r/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
