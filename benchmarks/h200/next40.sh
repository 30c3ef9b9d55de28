#!/bin/bash
# H200 x1, ~4 min, every job alone (for the eleventh session). (1) BERT-large mb32's memory, plain and through
# RanncModule eager without offload and with optimizer offload and no GPU-stepped blocks (next39's forced run ran
# out of memory at 24 GiB against 17.25 predicted): what is alive at the peak, by captured-graph node. (2) BERT-large
# under 24 GiB: the default plan (now recompute full, one micro-batch) and optimizer offload forced.
source "$(dirname "$0")/lib.sh"
job memprobe 0 0-15 110 python3 benchmarks/memory_probe.py --model bert-large --microbatch 32 --rannc none optimizer:24GiB:0 --out $OUT/results/memprobe; wait
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --no-profile --steps 5 --warmup 2"
job bert_auto 0 0-15 50 $B --out $OUT/results/bert_auto; wait
job bert_opt 0 0-15 $((225 - SECONDS)) $B --offload optimizer --out $OUT/results/bert_opt; wait
cat "$OUT/logs/summary.txt"
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
