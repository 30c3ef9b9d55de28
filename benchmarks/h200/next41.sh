#!/bin/bash
# H200 x2, ~8 min, every job alone (for the eleventh session, if two-GPU machines are lent again): next38's first job
# (GPT-2 2.7B over two stages at 12 GiB per GPU, after the tied-gradient copy fix, profiled), then next40.sh's
# one-GPU jobs on GPU 0 (BERT-large's memory by captured-graph node; its default and forced optimizer offload).
source "$(dirname "$0")/lib.sh"
R="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 16 --num-stages 2 --partitioners auto --warmup 2"
job off12 0,1 0-31 170 env OUT=$OUT/results/off12 $R --steps 4 --gpu-memory 12GiB --profile; wait
job memprobe 0 0-15 120 python3 benchmarks/memory_probe.py --model bert-large --microbatch 32 --rannc none optimizer:24GiB:0 --out $OUT/results/memprobe; wait
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 2"
job bert_auto 0 0-15 60 $B --out $OUT/results/bert_auto; wait
job bert_opt 0 0-15 $((470 - SECONDS)) $B --offload optimizer --out $OUT/results/bert_opt; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], r['microbatches'], [round(x,2) for x in r['peak_gib_per_rank']], [round(x,4) for x in r['step_times_s']])"; done
grep -h "Memcpy DtoH (Device -> Pageable)\|ncclDevKernel_SendRecv" $OUT/results/off12/profile_rank*.txt | cut -c1-60,100-200
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
grep -h "^0 \|PlanDoesNotFit" $OUT/logs/bert_*.log | cut -c1-400 | head
python3 -c "
import json; d=json.load(open('$OUT/results/memprobe/memory_probe_bert-large.json'))
for c in d['cases']:
    m=c.get('measured',{}); print(c['microbatch'], 'plain', {k: round(v,2) for k,v in m.items() if isinstance(v,float)})
    for r in c.get('rannc', []):
        print(' rannc', r.get('offload'), r.get('cap'), (r.get('error') or '')[:200], {k: round(v,2) for k,v in r.items() if isinstance(v,float)})
        print('   plan', {k: round(v,2) for k,v in (r.get('plan_memory_gib') or {}).items()})
        for s,b in (r.get('alive_at_peak_by_site_gib') or [])[:14]: print('   %.3f'%b, s)"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
