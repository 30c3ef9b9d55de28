#!/bin/bash
# H200 x1 (the issue's box: one GPU, 16 cores, ~125 GiB host), ~8 min, every job alone on the machine (sixth session,
# third call; the second call's jobs shared the host with DeepSpeed's CPU Adam, which slows the host-memory-bound
# step of both). First gradients now go to the host upcast on the GPU straight into the fp32 buffer (no host fold).
# 1. the CUDA correctness check; 2. GPT-2 2.7B under 24 GiB, streaming off; 3. DeepSpeed ZeRO-3 offload, same model
# and batch; 4. the same 2.7B run with the auto count of streamed blocks; 5. GPT-2 1.3B under 24 GiB, planner's plan.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 6 --warmup 2"
job check 0 0-15 90 python3 benchmarks/offload_gpu_check.py; wait
job s0 0 0-15 120 env RANNC_HF_OFFLOAD_STREAM_STEP=0 $P --out $OUT/results/s0; wait
job ds3 0 0-15 180 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job sauto 0 0-15 $((480 - SECONDS)) $P --out $OUT/results/sauto; wait
job g13 0 0-15 $((545 - SECONDS)) python3 benchmarks/offload_profile.py rannc --no-profile --steps 5 --warmup 1 --out $OUT/results/g13; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -20; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json,sys; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'cpu_step %.3f fold %.3f h2d %.1f d2h %.1f' % (e.get('step_time_s',0), e.get('grad_reduce_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']], [round(x,3) for x in r['losses']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
