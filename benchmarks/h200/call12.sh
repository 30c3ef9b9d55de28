#!/bin/bash
# H200 x2, the fourth 2026-11-30 session's second call (~9.5 min), after micro-batch gradients summed on the GPU
# (engine device_accumulate) and compiled stages cut at offload fences. GPU 0: the CUDA check through
# RanncModule (both accumulation paths), then the Trainer's offload overhead (issue 6; call 11 ran out of time).
# GPU 1: GPT-2 1.3B under 24 GiB with the planner's new plan (optimizer offload, 4 micro-batches summed on the
# GPU), 30 steps on learnable batches (loss curve vs call 11's plain run), then the GPT recipe WITHOUT offload,
# uncapped, 200 steps (does the loss also rise after step 100, as with offload? issue 7).
source "$(dirname "$0")/lib.sh"
( job check_rannc 0 0-15 120 python3 benchmarks/offload_gpu_check.py --rannc-only; wait
  job trainer_offload 0 0-15 $((560 - SECONDS)) python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 40 --warmup 5 --out $OUT/results; wait ) &
( job curve_offload 1 16-31 200 python3 benchmarks/offload_profile.py rannc --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
  job recipe_gpt_plain 1 16-31 $((560 - SECONDS)) env RANNC_HF_OFFLOAD=none RANNC_HF_GPU_MEMORY=none python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-plain --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10; wait ) &
wait
mkdir -p $OUT/recipes; cp /tmp/recipes/gpt-plain/{history.json,rannc_stats.json,loss.png} $OUT/recipes/ 2>/dev/null
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
