#!/bin/bash
# A/B: GPT-2 1.3B offload default at the session-start commit (ab_old) and at HEAD, same machine, alone.
source "$(dirname "$0")/lib.sh" 2>/dev/null || source benchmarks/h200/lib.sh
C="benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 5 --warmup 2"
( cd ab_old && CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD:/tmp/site timeout 100 python3 $C --out $OUT/results/old > $OUT/logs/old.log 2>&1; echo "old rc=$?" >> $OUT/logs/summary.txt )
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 $C --out $OUT/results/new > $OUT/logs/new.log 2>&1; echo "new rc=$?" >> $OUT/logs/summary.txt
cat $OUT/logs/summary.txt
for d in old new; do python3 -c "
import json; r=json.load(open('$OUT/results/$d/offload_profile_rannc.json'))
print('$d', 'step %.4f pred %.4f' % (r['step_time_s'], r['predicted_step_time_s']), r.get('blocks'), [round(x,3) for x in r['step_times_s']], round(r['engine_per_step'].get('step_time_s',0),3))"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
