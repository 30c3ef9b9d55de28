#!/bin/bash
# H200 x1, ~2 min (for the eleventh session). BERT-large, batch 32, 24 GiB: the planner's new default (recompute full,
# one micro-batch) ran 372 ms against 125 predicted and 140 for the old default (2 micro-batches, no recompute).
# A profiled run of the recompute plan, and the old default forced, with the current code.
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --offload none"
job rcprof 0 0-15 90 $B --recompute full --microbatches 1 --steps 3 --warmup 2 --out $OUT/results/rcprof; wait
job m2 0 0-15 $((150 - SECONDS)) $B --recompute none --microbatches 2 --no-profile --steps 5 --warmup 2 --out $OUT/results/m2; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
grep -A22 "Self CUDA %" $OUT/logs/rcprof.log | cut -c1-58,100-175 | head -50
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
