#!/bin/bash
# H200 x1, ~4.5 min, every job alone (thirteenth session): GPT-2 2.7B's offload default under 24 GiB (the issue's
# headline run, 745 ms in the twelfth session) with the per-parameter and the flat CPU AdamW step, one after the other.
source "$(dirname "$0")/lib.sh"
C="python3 benchmarks/offload_profile.py rannc --model 2.7b --step-in-backward --no-profile --steps 5 --warmup 2"
RANNC_HF_OFFLOAD_FLAT_STEP=0 job d27_split 0 0-15 130 $C --out $OUT/results/d27_split; wait
job d27_flat 0 0-15 $((280 - SECONDS)) $C --out $OUT/results/d27_flat; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f')); w=[x for x in r.get('worker_log', []) if x[0]=='step']
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f cpu_step/step %.4f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0), r['engine_per_step'].get('step_time_s',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']], 'worker steps ms', [round((x[4]-x[3])*1e3,1) for x in w][:12])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
