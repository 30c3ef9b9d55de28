#!/bin/bash
# H200 x1, third session, call 9 (~9.5 min; the two-GPU kind was not lent): the RanncModule offload check on
# CUDA, the GPT 1.3B recipe with offload under 24 GiB for 200 steps (learning rate now by model width: 2e-4),
# then offload_profile.py on RanncModule (where do 1.39 s/step go when the plan predicts 0.45 s?).
source "$(dirname "$0")/lib.sh"
R="--rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10"
job rannc_offload_check 0 0-15 75 python3 benchmarks/offload_gpu_check.py --rannc-only; wait
job recipe_gpt 0 0-15 $((450 - SECONDS)) python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b $R; wait
job profile_rannc 0 0-15 $((570 - SECONDS)) python3 benchmarks/offload_profile.py rannc --steps 6 --out $OUT/results; wait
for r in gpt-1.3b; do mkdir -p $OUT/recipes/$r; cp /tmp/recipes/$r/{history.json,rannc_stats.json,loss.png} $OUT/recipes/$r/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
