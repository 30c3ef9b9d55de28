#!/bin/bash
# H200 x1, ~8 min, every job alone (tenth session). The whole CUDA check after the ninth session's engine changes,
# GPT-2 2.7B batch 8 as planned now (rest group on the GPU, 760 ms predicted) with DeepSpeed ZeRO-3 offload in the
# same call, then where the cost model misses BERT-large (-20% eager, uncapped) against GPT-2 1.3B (+1%).
source "$(dirname "$0")/lib.sh"
ds_wheels
P="python3 benchmarks/offload_profile.py rannc --no-profile --step-in-backward --steps 5 --warmup 2"
job check 0 0-15 110 python3 benchmarks/offload_gpu_check.py; wait
job d27 0 0-15 130 $P --model 2.7b --out $OUT/results/d27; wait
job ds3 0 0-15 170 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job costs 0 0-15 $((480 - SECONDS)) env OUT=$OUT/results python3 benchmarks/cost_breakdown.py --variants bert-large:32 1.3b:16; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -20; cat $OUT/results/*.jsonl; cat $OUT/logs/costs.log | grep -v Warn
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
