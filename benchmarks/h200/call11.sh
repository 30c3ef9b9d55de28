#!/bin/bash
# H200 x2, the fourth 2026-11-30 session's first call (~9.5 min): next.sh's jobs on GPU 0 (the Trainer's offload
# overhead after the third session's fixes, issue 6; GPT-2 1.3B loss curves with and without offload, issue 7)
# and next2.sh's on GPU 1 (the BERT-large recipe's 200 steps with final eval and stats, issue 7; the experimental
# side-stream GPU step's CUDA check and step time), side by side. Both GPUs share the host's memory bandwidth:
# the Trainer/loop ratio is taken within GPU 0's job, where both scenarios see the same neighbour.
source "$(dirname "$0")/lib.sh"
( job trainer_offload 0 0-15 240 python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 60 --warmup 10 --out $OUT/results; wait
  job curve_plain 0 0-15 150 python3 benchmarks/offload_profile.py plain --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
  job curve_offload 0 0-15 $((555 - SECONDS)) python3 benchmarks/offload_profile.py rannc --no-profile --steps 30 --warmup 0 --out $OUT/results; wait ) &
( job recipe_bert 1 16-31 330 env RANNC_HF_OFFLOAD=optimizer python3 recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --output_dir /tmp/recipes/bert-large --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --eval_every 0 --log_every 10; wait
  job check_step_stream 1 16-31 100 env RANNC_HF_OFFLOAD_STEP_STREAM=1 python3 benchmarks/offload_gpu_check.py; wait
  job profile_step_stream 1 16-31 $((555 - SECONDS)) env RANNC_HF_OFFLOAD_STEP_STREAM=1 python3 benchmarks/offload_profile.py rannc --steps 6 --out $OUT/results/step_stream; wait ) &
wait
mkdir -p $OUT/recipes; cp /tmp/recipes/bert-large/{history.json,rannc_stats.json,loss.png} $OUT/recipes/ 2>/dev/null
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
