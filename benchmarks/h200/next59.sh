#!/bin/bash
# H200 x1, ~7 min, every job alone (fourteenth session). compile: auto now compiles encoders through their captured
# graph. Every zoo family compiled against eager (bf16, losses); BERT-large's 24 GiB default plan compiled (the
# new default) against eager, and with optimizer offload forced, compiled; then the whole CUDA check.
source "$(dirname "$0")/lib.sh"
job families 0 0-15 150 python3 benchmarks/h200/compile_families.py; wait
B="benchmarks/offload_profile.py --model bert-large --batch 32 --steps 8 --warmup 3 --no-profile"
job bert_auto 0 0-15 90 python3 $B rannc --out $OUT/results/bert_auto; wait
job bert_eager 0 0-15 60 python3 $B rannc-eager --out $OUT/results/bert_eager; wait
job bert_opt 0 0-15 90 python3 $B rannc --offload optimizer --out $OUT/results/bert_opt; wait
job check 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_gpu_check.py; wait
cat "$OUT/logs/summary.txt"; grep -v Warn $OUT/logs/families.log | grep "OK\|BAD\|FAIL" | cut -c1-300
grep "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -5; grep -c " OK" $OUT/logs/check.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
for n in bert_auto bert_eager bert_opt; do grep -A3 "^stage " $OUT/logs/$n.log | head -4; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
