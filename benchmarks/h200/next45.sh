#!/bin/bash
# H200 x1, ~6 min, every job alone (twelfth session). BERT-large compiled was measured 0.88x eager (next32/next33)
# while export's all-true constant mask sent attention to the fp32 math kernel; the capture fix dropped that mask.
# Is RanncModule's compiled BERT faster than eager now (compile: auto leaves encoders eager on that one figure)?
# Plain eager/compiled beside it; then the 24 GiB BERT plan with compile forced on.
source "$(dirname "$0")/lib.sh"
job single 0 0-15 330 env RANNC_HF_RESULTS=$OUT/results python3 benchmarks/single_gpu.py --variants plain:bert-large:32 rannc:bert-large:32 rannc-compile:bert-large:32 plain-compile:bert-large:32 --steps 6 --warmup 3; wait
job bert_c 0 0-15 $((530 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 3 --compile true --out $OUT/results/bert_c; wait
cat "$OUT/logs/summary.txt"; grep -v Warn $OUT/logs/single.log | grep -i "tokens/s\|error\|Traceback\|ratio" | tail -12
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), r['allocator_per_step'], [round(x,3) for x in r['step_times_s']])"; done
grep -h "stage\|M=" $OUT/logs/bert_c.log | head -5
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
