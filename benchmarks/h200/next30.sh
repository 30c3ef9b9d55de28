#!/bin/bash
# H200 x2, ~6 min, every job alone (for the tenth session: benchmarks/README.md item 3). GPT-2 2.7B over two
# pipeline stages, each GPU capped at 12 GiB: 6.1 s a step against 1.33 s planned in the ninth session, before the
# fix that keeps all but the tied embedding's gradients on the host. Then the same with steps in backward.
source "$(dirname "$0")/lib.sh"
R="python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/multi_gpu.py run --model gpt-2.7b --batch 16 --num-stages 2 --partitioners auto --steps 4 --warmup 2"
job off12 0,1 0-31 200 env OUT=$OUT/results/off12 $R --gpu-memory 12GiB; wait
job off12sib 0,1 0-31 $((330 - SECONDS)) env OUT=$OUT/results/off12sib $R --gpu-memory 12GiB --step-in-backward; wait
cat "$OUT/logs/summary.txt"
for f in $OUT/results/*/multi_gpu_*.json; do python3 -c "
import json; d=json.load(open('$f')); r=d['results'][0]
print('$f'.split('/')[-2], 'step %.3f pred %.3f tok/s %.0f' % (r['step_s'], r['predicted_step_s'], r['tokens_per_s']), r['offload'], [round(x,2) for x in r['peak_gib_per_rank']], [round(x,4) for x in r['losses']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
