#!/bin/bash
# H200 x1, ~9 min, every job alone (for the eighth session: benchmarks/README.md item 1). Unmeasured since the
# seventh session: converting copies in 32 MiB pieces, pooled gradient buffers for blocks stepped in backward, and
# no bf16 shadow trip back for GPU-stepped blocks that stay resident (optimizer mode). 1. the whole CUDA check
# (every engine variant, RanncModule modes, step_in_backward); 2. GPT-2 2.7B with step_in_backward (770-787 ms
# before); 3. DeepSpeed, same call; 4. GPT-2 1.3B with step_in_backward (443-460 ms before; optimizer mode: the
# shadow change applies). The first job on a fresh machine imports inductor slowly: limits are wide.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --no-profile --step-in-backward --steps 5 --warmup 2"
job check 0 0-15 110 python3 benchmarks/offload_gpu_check.py; wait
job sib 0 0-15 160 $P --model 2.7b --out $OUT/results/sib; wait
job ds3 0 0-15 170 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job s13 0 0-15 $((560 - SECONDS)) $P --out $OUT/results/s13; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -20; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
