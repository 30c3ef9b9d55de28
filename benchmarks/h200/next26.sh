#!/bin/bash
# H200 x2, ~5 min, every job alone (ninth session). (1) Offload inside a 2-stage pipeline on CUDA trains the same
# model as no offload: tiny GPT-2 (tied embeddings), fp32, same weights and batch, each engine path (CPU-stepped
# blocks, GPU-stepped blocks, params streamed, steps inside backward): the per-step losses must agree to rounding.
# (2) GPT-2 2.7B, 2 stages capped at 12 GiB, with the host step's threads no longer left at torchrun's one.
source "$(dirname "$0")/lib.sh"
T="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-tiny --batch 8 --num-stages 2 --partitioners auto --steps 3 --warmup 1 --precision fp32"
job t_none 0,1 0-31 60 env OUT=$OUT/results/t_none $T --offload none; wait
job t_opt0 0,1 0-31 60 env OUT=$OUT/results/t_opt0 $T --offload optimizer --gpu-step-blocks 0; wait
job t_opt 0,1 0-31 60 env OUT=$OUT/results/t_opt $T --offload optimizer; wait
job t_all0 0,1 0-31 60 env OUT=$OUT/results/t_all0 $T --offload all --gpu-step-blocks 0; wait
job t_sib 0,1 0-31 60 env OUT=$OUT/results/t_sib $T --offload optimizer --gpu-step-blocks 0 --step-in-backward; wait
R="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 16 --num-stages 2 --partitioners auto --steps 4 --warmup 2"
job off12 0,1 0-31 $((330 - SECONDS)) env OUT=$OUT/results/off12 $R --gpu-memory 12GiB; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], [round(x,2) for x in r['peak_gib_per_rank']], [repr(x) for x in r['losses']])"; done
for f in $OUT/logs/t_*.log $OUT/logs/off12.log; do grep -h "Error\|error" $f | head -3; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
