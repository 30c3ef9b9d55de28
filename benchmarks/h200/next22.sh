#!/bin/bash
# H200 x1, ~2 min (eighth session, call 6). The defaults after the resident-working-set fix changed the plans'
# memory (and so gpu_step_blocks: auto and where the rest group steps): GPT-2 2.7B and 1.3B with step_in_backward
# under 24 GiB as planned now.
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --no-profile --steps 4 --warmup 2 --step-in-backward"
job d27 0 0-15 100 $P --model 2.7b --out $OUT/results/d27; wait
job d13 0 0-15 $((175 - SECONDS)) $P --out $OUT/results/d13; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
