#!/bin/bash
# H200 x1, ~8 min, every job alone (for the eleventh session: benchmarks/README.md items 2, 4, 5). The whole CUDA
# check with room to finish; eager GPT-2 1.3B through RanncModule at 1 and 8 micro-batches, no offload (autocast
# re-casts every fp32 weight per micro-batch: 12 bytes a parameter each, not priced; compare with
# benchmarks/cost_check.py); BERT-large under 24 GiB, its default and optimizer offload forced, eager now.
source "$(dirname "$0")/lib.sh"
E="python3 benchmarks/offload_profile.py rannc-eager --model 1.3b --batch 16 --offload none --cap 130GiB --recompute none --no-profile --steps 4 --warmup 2"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 2"
job check 0 0-15 220 python3 benchmarks/offload_gpu_check.py; wait
job eager_m1 0 0-15 80 $E --microbatches 1 --out $OUT/results/eager_m1; wait
job eager_m8 0 0-15 80 $E --microbatches 8 --out $OUT/results/eager_m8; wait
job bert_opt 0 0-15 90 $B --offload optimizer --out $OUT/results/bert_opt; wait
job bert_auto 0 0-15 $((540 - SECONDS)) $B --out $OUT/results/bert_auto; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -5
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
