#!/bin/bash
# H200 x1, ~3 min, every job alone (ninth session, last call). The planner's defaults after it learned compiled
# stages' activations and the GPU gradient sums: GPT-2 2.7B with 64k tokens per step (it now plans 32 x 2 without
# recompute, optimizer offload, sums on the GPU: what next25.sh forced), and GPT-2 1.3B, batch 8 (it now plans no
# recompute), both under 24 GiB with step_in_backward. No environment overrides.
source "$(dirname "$0")/lib.sh"
job d64k 0 0-15 150 python3 benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --step-in-backward --no-profile --steps 2 --warmup 1 --out $OUT/results/d64k; wait
job d13 0 0-15 $((250 - SECONDS)) python3 benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 4 --warmup 2 --out $OUT/results/d13; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
for f in $OUT/logs/d*.log; do grep -h "^Plan\|^0 \|Error\|error" $f | head -5; tail -2 $f; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
