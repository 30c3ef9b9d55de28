#!/bin/bash
# H200 x1, ~7 min, every job alone (thirteenth session, after next52). The whole CUDA check with the flat CPU step
# (fp32 equality of every engine path); then the host-bound points the cost model's engine host time is fitted
# on: GPT-2 1.3B under 24 GiB at 8 micro-batches of 1 (the planner's offload), BERT-large with optimizer offload
# forced at 1 x 32 (again) and 2 x 16, and 1 x 32 with RANNC_HF_OFFLOAD_DEVICE_GRADS=1.
source "$(dirname "$0")/lib.sh"
job check 0 0-15 220 python3 benchmarks/offload_gpu_check.py; wait
job gpt_m8 0 0-15 110 python3 benchmarks/offload_profile.py rannc --batch 8 --microbatches 8 --no-profile --steps 4 --warmup 2 --out $OUT/results/gpt_m8; wait
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 8 --warmup 3 --offload optimizer --no-profile"
job bert_flat 0 0-15 60 $B --out $OUT/results/bert_flat; wait
job bert_m2 0 0-15 60 $B --microbatches 2 --out $OUT/results/bert_m2; wait
RANNC_HF_OFFLOAD_DEVICE_GRADS=1 job bert_dg 0 0-15 $((560 - SECONDS)) $B --out $OUT/results/bert_dg; wait
cat "$OUT/logs/summary.txt"; grep "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -5; grep -c " OK" $OUT/logs/check.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f cpu_step/step %.4f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0), r['engine_per_step'].get('step_time_s',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
grep -h -A2 "^stage  ops" $OUT/logs/gpt_m8.log $OUT/logs/bert_m2.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
