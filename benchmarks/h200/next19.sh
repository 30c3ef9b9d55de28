#!/bin/bash
# H200 x1, ~9 min, every job alone (eighth session, call 3). Out-of-sample check of the refit cost model (gemm
# efficiency 0.8, CPU step 2.5e9/s, 55 ps per parameter and step, fitted on calls 1-2's step_in_backward runs):
# configurations it was not fitted on. 1. GPT-2 2.7B, step after backward with clipping; 2. 2.7B step_in_backward
# under a 32 GiB cap; 3. 1.3B step after backward with clipping; 4. 1.3B step_in_backward under 16 GiB; 5. 2.7B
# step_in_backward under 24 GiB as the planner now chooses (rest group placed by cost).
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --no-profile --steps 5 --warmup 2"
job clip27 0 0-15 150 $P --model 2.7b --out $OUT/results/clip27; wait
job cap32 0 0-15 100 $P --model 2.7b --step-in-backward --cap 32GiB --out $OUT/results/cap32; wait
job clip13 0 0-15 70 $P --out $OUT/results/clip13; wait
job cap16 0 0-15 70 $P --step-in-backward --cap 16GiB --out $OUT/results/cap16; wait
job sib27 0 0-15 $((545 - SECONDS)) $P --model 2.7b --step-in-backward --out $OUT/results/sib27; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f err %+.1f%% tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], 100*(r['predicted_step_time_s']/r['step_time_s']-1), r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
grep -h -A3 "^Plan" $OUT/logs/*.log | grep -v "^--\|^stage"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
