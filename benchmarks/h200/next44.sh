#!/bin/bash
# H200 x1, ~1.5 min (for the eleventh session). BERT-large, batch 32, 24 GiB, 2 micro-batches through the captured
# graph, with a padded attention_mask (the last eighth of each sequence): which attention kernel runs (next42 saw
# the fp32 math kernel under export's constant mask, now dropped), and the step time against 159 ms unpadded.
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --offload none --recompute none --microbatches 2 --steps 5 --warmup 2"
job padded 0 0-15 110 $B --padded --out $OUT/results/padded; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
grep -h "attention\|sdpa\|fmha\|flash" $OUT/logs/padded.log | cut -c1-60,100-175 | sort | uniq | head -20
rm -f $OUT/results/padded/trace_*.gz
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
