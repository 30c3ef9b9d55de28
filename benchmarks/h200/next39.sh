#!/bin/bash
# H200 x1, ~6 min, every job alone (for the eleventh session, while two-GPU machines were not lent). (1) BERT-large's
# memory, measured against the planner's (memory_probe.py), and its optimizer offload with no GPU-stepped blocks
# (the base the engine's auto fill adds to; next35's forced run ran out of memory). (2) fp32 equality at 2.7B on
# one GPU: no offload, uncapped, against capped at 24 GiB with the plan's offload, the same host-drawn weights.
source "$(dirname "$0")/lib.sh"
job memprobe 0 0-15 80 python3 benchmarks/memory_probe.py --model bert-large --microbatch 32 16 --out $OUT/results/memprobe; wait
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 4 --warmup 2"
job bert_opt0 0 0-15 70 $B --offload optimizer --gpu-step-blocks 0 --out $OUT/results/bert_opt0; wait
R="python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 8 --num-stages 1 --partitioners auto --warmup 2 --steps 2 --precision fp32"
job fp32none 0 0-15 130 env OUT=$OUT/results/fp32none $R --offload none --build-on cpu; wait
job fp32cap 0 0-15 $((500 - SECONDS)) env OUT=$OUT/results/fp32cap $R --gpu-memory 24GiB; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], r['microbatches'], [round(x,2) for x in r['peak_gib_per_rank']], [round(x,6) for x in r['losses']])"; done
python3 -c "
import json; d=json.load(open('$OUT/results/memprobe/memory_probe_bert-large.json'))
for c in d['cases']:
    m=c.get('measured',{}); print(c['microbatch'], 'pred', round(c['predicted']['peak_gib'],2), {k: round(v,2) for k,v in m.items() if k.endswith('gib')}); print(m.get('alive_at_peak_by_site_gib', [])[:12])"
for f in $OUT/results/bert_opt0/*.json; do python3 -c "
import json; r=json.load(open('$f')); print('bert_opt0 step %.4f pred %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r.get('max_allocated_gib',0)), r.get('blocks'))"; done
grep -h "^Plan\|predicted step\|^0 " $OUT/logs/bert_opt0.log | head -5
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
