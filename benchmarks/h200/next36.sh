#!/bin/bash
# H200 x2, ~9 min, every job alone (for the eleventh session: benchmarks/README.md item 1). GPT-2 2.7B over two
# pipeline stages, each GPU capped at 12 GiB (2.30 s measured in the tenth session, 1.90 s now predicted), with each
# rank's engine counters, worker log and one step under torch.profiler (--profile); the host-dispatch and optimizer
# probes (benchmarks/host_dispatch.py, one GPU); then the same model in fp32,
# uncapped without offload and capped at 16 GiB with the plan's offload: their losses must agree step for step.
source "$(dirname "$0")/lib.sh"
R="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 16 --num-stages 2 --partitioners auto --steps 4 --warmup 2"
job off12 0,1 0-31 220 env OUT=$OUT/results/off12 $R --gpu-memory 12GiB --profile; wait
job dispatch 0 0-15 80 python3 benchmarks/host_dispatch.py --out $OUT/results/dispatch; wait
R="${R/--steps 4/--steps 2}"
job fp32none 0,1 0-31 110 env OUT=$OUT/results/fp32none $R --precision fp32 --offload none; wait
job fp32cap 0,1 0-31 $((555 - SECONDS)) env OUT=$OUT/results/fp32cap $R --precision fp32 --gpu-memory 16GiB; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], [round(x,2) for x in r['peak_gib_per_rank']], [round(x,6) for x in r['losses']])
for p in r.get('profile_per_rank') or []:
    e = p.get('engine_per_step', {}); print(' rank', p['rank'], {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items() if k.endswith('_s') or k in ('hidden_fraction', 'mode')})"; done
head -n 30 $OUT/results/off12/profile_rank*.txt; grep -h "ms)" $OUT/logs/dispatch.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
