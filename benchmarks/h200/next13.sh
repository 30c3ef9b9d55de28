#!/bin/bash
# H200 x1, ~9 min, every job alone (seventh session, call 2): where step_in_backward's 787 ms go (vs plain's compute),
# and 64k tokens per step with it. 1-2. fewer CPU-step threads (the worker shares 16 cores with the main thread that
# launches backward); 3. 21 GPU-stepped blocks (peak 19.8 of 21.6 GiB usable with 18); 4. plain PyTorch uncapped
# with recompute, accumulation 1 (the compute floor of ours); 5. 8 micro-batches of 8 with step_in_backward.
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 5 --warmup 2 --step-in-backward"
job t12 0 0-15 95 env RANNC_HF_OFFLOAD_CPU_THREADS=12 $P --out $OUT/results/t12; wait
job t8 0 0-15 95 env RANNC_HF_OFFLOAD_CPU_THREADS=8 $P --out $OUT/results/t8; wait
job g21 0 0-15 95 $P --gpu-step-blocks 21 --out $OUT/results/g21; wait
job plain1 0 0-15 110 python3 benchmarks/offload_gpt.py --cases plain:1 --warmup 2 --steps 5 --out $OUT/results/plain1.json; wait
job acc8 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --batch 64 --microbatches 8 --steps 2 --warmup 1 --step-in-backward --out $OUT/results/acc8; wait
cat "$OUT/logs/summary.txt"; grep -h "step_s\|tokens_per_s\|plain" $OUT/results/plain1.json | head -20
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f stall %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('stall_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
for n in t12 t8 g21 plain1 acc8; do tail -2 $OUT/logs/$n.log; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
