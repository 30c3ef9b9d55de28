#!/bin/bash
# H200 x2, the next session's first call: the GPT 1.3B recipe (issue 7) on GPU 0; on GPU 1 the offload
# accumulation-8 and K=20 cases (issue 4), then the Trainer's offload scenarios (issue 6), 120 steps.
source "$(dirname "$0")/lib.sh"
R="--rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10"
job recipe_gpt 0 0-15 450 python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b $R
( job offload_gpt 1 16-31 200 python3 benchmarks/offload_gpt.py --cases optimizer:8:16,optimizer:1:20 --warmup 1 --steps 3 --out $OUT/results/offload_gpt_h200_v4.json; wait
  job trainer_offload 1 16-31 420 python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 120 --warmup 20 --out $OUT/results; wait ) &
wait
mkdir -p $OUT/recipes/gpt-1.3b; cp /tmp/recipes/gpt-1.3b/{history.json,rannc_stats.json,loss.png} $OUT/recipes/gpt-1.3b/ 2>/dev/null
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
