#!/bin/bash
# H200 x1, ~6 min, every job alone (twelfth session; benchmarks/README.md items 2 and 3). BERT-large under 24 GiB
# through the captured graph is 13-24% slower than priced: one profiled step of the recompute plan and of 2
# micro-batches of 16 without recompute, each analyzed by trace_gaps.py (GPU busy vs idle, idle charged to the host
# op running); host enqueue time and allocator retries per step. Then eager GPT-2 1.3B, one micro-batch of 16,
# through RanncModule with the fused AdamW default (517 ms with foreach).
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 5 --warmup 3 --offload none"
job rec 0 0-15 110 $B --recompute full --microbatches 1 --out $OUT/results/rec; wait
job m2 0 0-15 110 $B --recompute none --microbatches 2 --out $OUT/results/m2; wait
job rec_uncapped 0 0-15 80 $B --recompute full --microbatches 1 --cap 130GiB --no-profile --out $OUT/results/rec_uncapped; wait
job eager_m1 0 0-15 $((500 - SECONDS)) python3 benchmarks/offload_profile.py rannc-eager --model 1.3b --batch 16 --offload none --cap 130GiB --recompute none --no-profile --steps 4 --warmup 2 --microbatches 1 --out $OUT/results/eager_m1; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), r['allocator_per_step'], [round(x,3) for x in r['step_times_s']])"; done
for d in rec m2; do python3 benchmarks/trace_gaps.py $OUT/results/$d/trace_rannc.json.gz --json $OUT/results/$d/gaps.json | head -40; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
