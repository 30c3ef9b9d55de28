#!/bin/bash
# H200 x1, ~8 min, every job alone (twelfth session). After RanncModule's clip_grad_norm_ went from a loop over
# 394 gradients (17-29 ms of host time a step on BERT-large, the GPU idle: next46's profile) to one foreach call
# per dtype, and the cost model learned autocast's weight casts and the slower up-cast in backward: BERT-large
# under 24 GiB (the default, recompute at 1 x 32, 2 x 16, optimizer offload forced, recompute profiled), eager
# GPT-2 1.3B through RanncModule at 1 and 8 micro-batches of 16 samples, and the GPT-2 offload defaults.
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 6 --warmup 3"
E="python3 benchmarks/offload_profile.py rannc-eager --model 1.3b --batch 16 --offload none --cap 130GiB --recompute none --no-profile --steps 4 --warmup 2"
job bert_auto 0 0-15 60 $B --no-profile --out $OUT/results/bert_auto; wait
job rec 0 0-15 70 $B --offload none --recompute full --microbatches 1 --out $OUT/results/rec; wait
job m2 0 0-15 50 $B --no-profile --offload none --recompute none --microbatches 2 --out $OUT/results/m2; wait
job bert_opt 0 0-15 60 $B --no-profile --offload optimizer --out $OUT/results/bert_opt; wait
job eager_m1 0 0-15 60 $E --microbatches 1 --out $OUT/results/eager_m1; wait
job eager_m8 0 0-15 60 $E --microbatches 8 --out $OUT/results/eager_m8; wait
job d13 0 0-15 60 python3 benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 4 --warmup 2 --out $OUT/results/d13; wait
job d27 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --step-in-backward --no-profile --steps 5 --warmup 2 --out $OUT/results/d27; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), r['allocator_per_step'].get('num_alloc_retries'), [round(x,3) for x in r['step_times_s']])"; done
grep -h -A3 "^stage  ops" $OUT/logs/bert_auto.log $OUT/logs/bert_opt.log | grep "^0 "
python3 benchmarks/trace_gaps.py $OUT/results/rec/trace_rannc.json.gz --json $OUT/results/rec/gaps.json | head -30
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
