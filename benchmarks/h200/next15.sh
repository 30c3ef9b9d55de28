#!/bin/bash
# H200 x1, ~4.5 min, every job alone (seventh session, call 4): converting copies in 32 MiB pieces and pooled gradient
# buffers for blocks stepped in backward (call 3's trace: a 515 MB fp32 temporary at the end of backward made the
# allocator flush its cache and block the host 183 ms). 1. CUDA check of step_in_backward; 2. GPT-2 2.7B; 3. GPT-2 1.3B.
source "$(dirname "$0")/lib.sh"
job check 0 0-15 60 python3 benchmarks/offload_gpu_check.py --in-backward-only; wait
job sib 0 0-15 110 env RANNC_HF_OFFLOAD_CPU_THREADS=12 python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 5 --warmup 2 --step-in-backward --out $OUT/results/sib; wait
job s13 0 0-15 $((265 - SECONDS)) python3 benchmarks/offload_profile.py rannc --no-profile --steps 5 --warmup 2 --step-in-backward --out $OUT/results/s13; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|OK" $OUT/logs/check.log | tail -14
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f stall %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('stall_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
