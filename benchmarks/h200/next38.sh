#!/bin/bash
# H200 x2, ~7 min, every job alone (for the eleventh session). (1) GPT-2 2.7B over two stages at 12 GiB per GPU after
# the fix that writes the tied embedding's all-reduced gradient straight into the engine's pinned buffer (a pageable
# copy took 0.46 s of next36's 2.33 s step), profiled. (2) fp32 equality at 2.7B: no offload, uncapped, weights
# drawn on the host as the capped run's are (next36 drew them on the GPU: other weights), then capped at 16 GiB with
# the plan's offload.
source "$(dirname "$0")/lib.sh"
R="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 16 --num-stages 2 --partitioners auto --warmup 2"
job off12 0,1 0-31 170 env OUT=$OUT/results/off12 $R --steps 4 --gpu-memory 12GiB --profile; wait
job fp32none 0,1 0-31 120 env OUT=$OUT/results/fp32none $R --steps 2 --precision fp32 --offload none --build-on cpu; wait
job fp32cap 0,1 0-31 $((500 - SECONDS)) env OUT=$OUT/results/fp32cap $R --steps 2 --precision fp32 --gpu-memory 16GiB; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], r['microbatches'], [round(x,2) for x in r['peak_gib_per_rank']], [round(x,6) for x in r['losses']])
for p in r.get('profile_per_rank') or []:
    e = p.get('engine_per_step', {}); print(' rank', p['rank'], {k: round(v, 4) if isinstance(v, float) else v for k, v in e.items() if k.endswith('_s') or k in ('hidden_fraction',)})"; done
grep -h "Memcpy DtoH (Device -> Pageable)\|ncclDevKernel_SendRecv" $OUT/results/off12/profile_rank*.txt | cut -c1-60,100-200
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
