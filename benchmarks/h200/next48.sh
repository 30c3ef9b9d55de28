#!/bin/bash
# H200 x1, ~8 min, every job alone (twelfth session, after next47). Three runtime changes since: the loss's
# gradient applied on the device (no host read at the end of backward), recompute segments fed by gradients
# checkpointed reentrant (no Python hook per saved tensor), foreach clipping. The whole CUDA check first (every
# engine path equal to plain training, fp32); then BERT-large under 24 GiB (the default, recompute profiled,
# 2 x 16, optimizer offload), eager GPT-2 1.3B at one micro-batch of 16, and GPT-2 1.3B's offload default.
source "$(dirname "$0")/lib.sh"
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 6 --warmup 3"
job check 0 0-15 200 python3 benchmarks/offload_gpu_check.py; wait
job bert_auto 0 0-15 50 $B --no-profile --out $OUT/results/bert_auto; wait
job rec 0 0-15 60 $B --offload none --recompute full --microbatches 1 --out $OUT/results/rec; wait
job m2 0 0-15 45 $B --no-profile --offload none --recompute none --microbatches 2 --out $OUT/results/m2; wait
job bert_opt 0 0-15 50 $B --no-profile --offload optimizer --out $OUT/results/bert_opt; wait
job eager_m1 0 0-15 55 python3 benchmarks/offload_profile.py rannc-eager --model 1.3b --batch 16 --offload none --cap 130GiB --recompute none --no-profile --steps 4 --warmup 2 --microbatches 1 --out $OUT/results/eager_m1; wait
job d13 0 0-15 $((540 - SECONDS)) python3 benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 4 --warmup 2 --out $OUT/results/d13; wait
cat "$OUT/logs/summary.txt"; tail -4 $OUT/logs/check.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
grep -h -A3 "^stage  ops" $OUT/logs/bert_auto.log | grep "^0 "
python3 benchmarks/trace_gaps.py $OUT/results/rec/trace_rannc.json.gz --json $OUT/results/rec/gaps.json | head -24
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
