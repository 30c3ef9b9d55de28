#!/bin/bash
# H200 x1, ~3 min (tenth session): BERT-large MLM, seq 512, batch 32, under 24 GiB: optimizer offload forced
# (the offload cost model on a second family; 29% short in the fourth session, compiled then, eager now by
# compile: auto's masked-attention rule) and the planner's own choice.
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 2"
job bert_opt 0 0-15 110 $P --offload optimizer --out $OUT/results/bert_opt; wait
job bert_auto 0 0-15 $((200 - SECONDS)) $P --out $OUT/results/bert_auto; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
grep -h "^0 \|predicted step" $OUT/logs/bert_*.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
