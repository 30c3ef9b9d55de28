#!/bin/bash
# H200 x1, ~8 min, every job alone (seventh session, call 3): 1. FSDP2 + CPUOffloadPolicy, same model and batch (the
# 4x target, same call); 2. step_in_backward with 12 CPU-step threads, the worker's log and a torch.profiler trace of
# two steps (where the ~200 ms over plain's 573 ms go); 3. GPT-2 1.3B with the planner's plan and step_in_backward.
source "$(dirname "$0")/lib.sh"
job fsdp 0 0-15 170 env PEER_STEPS=3 OUT=$OUT/results python3 benchmarks/offload_peers.py fsdp2off; wait
job sibp 0 0-15 200 env RANNC_HF_OFFLOAD_CPU_THREADS=12 python3 benchmarks/offload_profile.py rannc --model 2.7b --steps 5 --warmup 2 --step-in-backward --out $OUT/results/sibp; wait
job s13 0 0-15 $((520 - SECONDS)) python3 benchmarks/offload_profile.py rannc --no-profile --steps 5 --warmup 2 --step-in-backward --out $OUT/results/s13; wait
cat "$OUT/logs/summary.txt"; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f stall %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('stall_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
grep -B2 -A40 "Self CUDA" $OUT/logs/sibp.log | head -60
ls -la $OUT/results/sibp
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
