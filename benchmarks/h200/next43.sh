#!/bin/bash
# H200 x1, ~2 min (for the eleventh session). BERT-large, batch 32, 24 GiB, after the capture fix that drops the
# all-true attention mask export built (next42: attention ran the fp32 math kernel): the default plan, optimizer
# offload forced, and 2 micro-batches without recompute forced.
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 2"
job bert_auto 0 0-15 50 $B --out $OUT/results/bert_auto; wait
job bert_opt 0 0-15 50 $B --offload optimizer --out $OUT/results/bert_opt; wait
job m2 0 0-15 $((150 - SECONDS)) $B --offload none --recompute none --microbatches 2 --out $OUT/results/m2; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
grep -h "^0 \|PlanDoesNotFit" $OUT/logs/*.log | cut -c1-300 | head
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
