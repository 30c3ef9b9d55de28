#!/bin/bash
# H200 x2, call 1: single-GPU speed (issue 3) on GPU 0, then the offload CUDA check; Trainer overhead (issue 6) on GPU 1.
source "$(dirname "$0")/lib.sh"
job single_gpu 0 0-15 420 env OUT=$OUT/results python3 benchmarks/single_gpu.py --steps 6 --warmup 2
job trainer_gpu 1 16-31 540 python3 benchmarks/trainer_gpu.py --steps 60 --warmup 10 --out $OUT/results
wait
job offload_gpu_check 0 0-15 150 python3 benchmarks/offload_gpu_check.py
wait
cat "$OUT/logs/summary.txt"
