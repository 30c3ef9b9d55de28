#!/bin/bash
# H200 x1, third session, call 10 (~8.5 min, the session's last device minutes): the RanncModule offload check
# on CUDA (call 9's failed on a capture-device bug, fixed), GPT 1.3B trained 30 steps with offload under 24 GiB
# vs without offload uncapped on the same learnable batches (bf16: does the offloaded run train the same model?),
# then the BERT-large recipe with optimizer offload for 200 steps (one evaluation, at the end).
source "$(dirname "$0")/lib.sh"
job rannc_offload_check 0 0-15 60 python3 benchmarks/offload_gpu_check.py --rannc-only; wait
job curve_plain 0 0-15 100 python3 benchmarks/offload_profile.py plain --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
job curve_offload 0 0-15 110 python3 benchmarks/offload_profile.py rannc --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
job recipe_bert 0 0-15 $((505 - SECONDS)) env RANNC_HF_OFFLOAD=optimizer python3 recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --output_dir /tmp/recipes/bert-large --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 0 --log_every 10; wait
for r in bert-large; do mkdir -p $OUT/recipes/$r; cp /tmp/recipes/$r/{history.json,rannc_stats.json,loss.png} $OUT/recipes/$r/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
