#!/bin/bash
# H200 x1, ~3 min (eighth session, call 4). GPT-2 1.3B with step_in_backward under a 16 GiB cap ran out of memory
# in backward in call 3 (a 1.54 GiB logits gradient) with the rest group and gpu_step_blocks: auto filling the
# headroom: is the rest group on the GPU the cause? 1. the same with the rest on the host; 2. with the rest on the GPU
# and no GPU-stepped layers.
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --no-profile --steps 3 --warmup 2 --step-in-backward --cap 16GiB"
job host16 0 0-15 110 env RANNC_HF_OFFLOAD_GPU_STEP_REST=0 $P --out $OUT/results/host16; wait
job rest16 0 0-15 70 $P --gpu-step-blocks 0 --out $OUT/results/rest16; wait
cat "$OUT/logs/summary.txt"; grep -h "OutOfMemoryError" $OUT/logs/*.log | cut -c1-400
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'))"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
