#!/bin/bash
# H200 x1, ~4 min (twelfth session, right after next48, whose recompute cases tripped on the check's own
# gpu_step_rest expectation): RanncModule with recompute full against plain on CUDA, then GPT-2 1.3B's offload
# default and BERT-large with optimizer offload again (next48 measured them far noisier than before).
source "$(dirname "$0")/lib.sh"
job check 0 0-15 60 python3 benchmarks/offload_gpu_check.py --recompute-only; wait
job d13 0 0-15 120 python3 benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 6 --warmup 2 --out $OUT/results/d13; wait
job bert_opt 0 0-15 $((280 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 8 --warmup 3 --no-profile --offload optimizer --out $OUT/results/bert_opt; wait
cat "$OUT/logs/summary.txt"; grep "recompute=full\|ALL OK\|SOME" $OUT/logs/check.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
