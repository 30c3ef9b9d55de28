#!/bin/bash
# H200 x2, call 5: the GPT 1.3B recipe with compile off (call 4 failed in a compiled offload stage), and on GPU 1
# a small reproduction of that failure.
source "$(dirname "$0")/lib.sh"
job debug 1 16-31 120 python3 benchmarks/h200/debug_cpu_capture.py
job recipe_gpt 0 0-15 270 env RANNC_HF_COMPILE=false python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10
wait
mkdir -p $OUT/recipes/gpt-1.3b; cp /tmp/recipes/gpt-1.3b/{history.json,rannc_stats.json,loss.png} $OUT/recipes/gpt-1.3b/ 2>/dev/null
cat "$OUT/logs/summary.txt"; cat "$OUT/logs/debug.log" | grep -v Warning | tail -30
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
