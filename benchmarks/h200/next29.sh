#!/bin/bash
# H200 x1, ~9 min, every job alone (for the tenth session: benchmarks/README.md item 2). 64k tokens per step: the
# planner's default (32 x 2, no recompute, optimizer offload, sums on the GPU; 3.36 s in the ninth session) with
# plain PyTorch accumulation 8 uncapped in the same call, eager (the issue's anchor) and with torch.compile.
source "$(dirname "$0")/lib.sh"
G="python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2"
job plain8 0 0-15 200 $G --out $OUT/results/plain8.json; wait
job d64k 0 0-15 150 python3 benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --step-in-backward --no-profile --steps 3 --warmup 1 --out $OUT/results/d64k; wait
job plain8c 0 0-15 $((520 - SECONDS)) $G --compile-plain --out $OUT/results/plain8c.json; wait
cat "$OUT/logs/summary.txt"; grep -h "tokens/s" $OUT/logs/plain*.log
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
