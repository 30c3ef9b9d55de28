#!/bin/bash
# H200 x1, ~7 min, every job alone (fourteenth session; benchmarks/README.md items 0, 2 and 4). The group-ordered
# block layout on CUDA (decay / no-decay groups stepped flat), then BERT-large with optimizer offload forced under
# 24 GiB with one param group and with the Trainer's groups; one profiled step of it (where the host's 150 ms of
# enqueue go since the gradient queue); BERT-large compiled with no offload and no cap, profiled (which attention
# kernels, how much memory: 32.9 GiB against 24.3 eager in next45).
source "$(dirname "$0")/lib.sh"
job groups 0 0-15 100 python3 benchmarks/offload_gpu_check.py --groups-only; wait
B="benchmarks/offload_profile.py rannc --model bert-large --batch 32 --offload optimizer"
job bert_one 0 0-15 70 python3 $B --steps 8 --warmup 3 --no-profile --out $OUT/results/bert_one; wait
job bert_dec 0 0-15 70 python3 $B --steps 8 --warmup 3 --no-profile --decay-groups --out $OUT/results/bert_dec; wait
job bert_prof 0 0-15 90 python3 $B --steps 5 --warmup 3 --out $OUT/results/bert_prof; wait
job bert_comp 0 0-15 $((500 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --offload none --cap 100GiB --compile true --steps 4 --warmup 3 --out $OUT/results/bert_comp; wait
cat "$OUT/logs/summary.txt"; grep "FAIL\|ALL OK\|SOME\|Traceback" $OUT/logs/groups.log | tail -5; grep -c " OK" $OUT/logs/groups.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
tail -5 $OUT/logs/bert_comp.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
