#!/bin/bash
# H200 x2, call 3: a 2-GPU pipeline over NCCL (GPT 6.7B, pp=2, auto vs even), then the recipes (issue 7):
# GPT 1.3B on GPU 0 and BERT-large on GPU 1, 200 steps each, 24 GiB cap (rannc_1gpu_offload.yaml).
source "$(dirname "$0")/lib.sh"
job multi_gpu 0,1 0-31 240 env OUT=$OUT/results torchrun --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-6.7b --partitioners auto even --steps 4 --warmup 2
wait
R="--rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 100 --log_every 10"
job recipe_gpt 0 0-15 330 python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --output_dir /tmp/recipes/gpt-1.3b $R
job recipe_bert 1 16-31 330 env RANNC_HF_OFFLOAD=optimizer python3 recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --output_dir /tmp/recipes/bert-large $R
wait
for d in gpt-1.3b bert-large; do mkdir -p $OUT/recipes/$d; cp /tmp/recipes/$d/*.png /tmp/recipes/$d/*.json $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
