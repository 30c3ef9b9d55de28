#!/bin/bash
# H200 x2, the next session's first call (~9.5 min), after the fourth 2026-11-30 session left checkpointed segments
# holding offload fences eager (compiled, they drifted). GPU 0: the GPT-2 1.3B recipe with offload under 24 GiB,
# 200 steps: does it now train like the recipe without offload (eval 6.27 @100, 6.06 @200; issue 7)?
# GPU 1: the Trainer's offload overhead over 100 steps (issue 6: 1.031x over 40 steps beside another job),
# then GPU-stepped blocks keeping their gradients on the GPU (RANNC_HF_OFFLOAD_DEVICE_GRADS=1, built in the fourth
# session, never run on a GPU): the full CUDA check (engine cases and RanncModule), then the params plan's step
# time and 10-step losses with it (call 15 without it: eager, same batches).
source "$(dirname "$0")/lib.sh"
R="--rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10"
job recipe_gpt 0 0-15 555 python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b $R
( job trainer_offload 1 16-31 400 python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 100 --warmup 10 --out $OUT/results; wait
  job check_device_grads 1 16-31 120 python3 benchmarks/offload_gpu_check.py; wait
  job device_grads 1 16-31 $((555 - SECONDS)) env RANNC_HF_OFFLOAD_DEVICE_GRADS=1 python3 benchmarks/offload_profile.py rannc --offload params --microbatches 1 --no-profile --steps 10 --warmup 0 --out $OUT/results/device_grads; wait ) &
wait
mkdir -p $OUT/recipes; cp /tmp/recipes/gpt-1.3b/{history.json,rannc_stats.json,loss.png} $OUT/recipes/ 2>/dev/null
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
