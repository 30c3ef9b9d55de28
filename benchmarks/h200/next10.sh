#!/bin/bash
# H200 x1, ~9 min, every job alone (for the seventh session: benchmarks/README.md item 1). GPT-2 2.7B under 24 GiB,
# where the sixth session left it (1,009 ms, 1.80x DeepSpeed): more GPU-stepped blocks (auto picks 18; the peak was
# 19.8 of 21.6 GiB usable) and fewer CPU-step threads (the worker shares 16 cores with the main thread and the
# copies), then DeepSpeed ZeRO-3 offload in the same call.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 5 --warmup 2"
job g20 0 0-15 95 $P --gpu-step-blocks 20 --out $OUT/results/g20; wait
job g22 0 0-15 95 $P --gpu-step-blocks 22 --out $OUT/results/g22; wait
job t14 0 0-15 95 env RANNC_HF_OFFLOAD_CPU_THREADS=14 $P --out $OUT/results/t14; wait
job t12 0 0-15 95 env RANNC_HF_OFFLOAD_CPU_THREADS=12 $P --out $OUT/results/t12; wait
job ds3 0 0-15 $((555 - SECONDS)) env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
cat "$OUT/logs/summary.txt"; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
