#!/bin/bash
# H200 x1, the next session's second call (~9 min): the BERT-large recipe with optimizer offload under 24 GiB,
# 200 steps with its final evaluation, stats table and checkpoint (the third session's run lost them to the
# device deadline); then the experimental side-stream GPU step (RANNC_HF_OFFLOAD_STEP_STREAM=1): the CUDA
# correctness check (engine alone and through RanncModule) and GPT-2 1.3B's step time with it
# (offload_profile.py rannc: 599 ms without it).
source "$(dirname "$0")/lib.sh"
job recipe_bert 0 0-15 330 env RANNC_HF_OFFLOAD=optimizer python3 recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --output_dir /tmp/recipes/bert-large --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 0 --log_every 10; wait
job check_step_stream 0 0-15 100 env RANNC_HF_OFFLOAD_STEP_STREAM=1 python3 benchmarks/offload_gpu_check.py; wait
job profile_step_stream 0 0-15 $((560 - SECONDS)) env RANNC_HF_OFFLOAD_STEP_STREAM=1 python3 benchmarks/offload_profile.py rannc --steps 6 --out $OUT/results; wait
mkdir -p $OUT/recipes/bert-large; cp /tmp/recipes/bert-large/{history.json,rannc_stats.json,loss.png} $OUT/recipes/bert-large/ 2>/dev/null
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
