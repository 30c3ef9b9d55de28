#!/bin/bash
# H200 x1, ~5 min, every job alone (thirteenth session; benchmarks/README.md item 2). BERT-large with optimizer
# offload forced under 24 GiB runs 190-235 ms against 169 priced, and the engine's CPU AdamW ran its layers at
# 0.9-1.1e9 parameters/s. First the fused CPU AdamW over BERT-large's and GPT-2 1.3B's layer shapes, per tensor and
# flat, by thread count and host load (h200/adam_shapes.py); then one profiled step of the BERT run (worker log,
# trace_gaps summary).
source "$(dirname "$0")/lib.sh"
job adam 0 0-15 150 python3 benchmarks/h200/adam_shapes.py; wait
job bert_opt 0 0-15 $((330 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 6 --warmup 3 --offload optimizer --out $OUT/results/bert_opt; wait
cat "$OUT/logs/summary.txt"; cat $OUT/logs/adam.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f cpu_step %.4f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0), r.get('engine_cpu_step_s') or 0), [round(x,3) for x in r['step_times_s']])
print(r.get('blocks')); print([w for w in r.get('worker_log', [])][:80])"; done
tail -60 $OUT/logs/bert_opt.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
