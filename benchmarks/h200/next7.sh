#!/bin/bash
# H200 x2, ~8 min (sixth session, second call): the streamed GPU step (optimizer state of some CPU-side blocks
# crosses PCIe and steps on the GPU while the CPU steps the others) and the GPU steps moved off the compute
# stream, GPT-2 2.7B under 24 GiB through RanncModule. GPU 0: streaming off, auto, auto + GPU-kept gradients.
# GPU 1: the CUDA correctness check (every engine variant equals plain training), DeepSpeed ZeRO-3 offload
# (the peer, same call), then a forced count of 12 streamed blocks.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 6 --warmup 2"
( job s0 0 0-15 150 env RANNC_HF_OFFLOAD_STREAM_STEP=0 $P --out $OUT/results/s0; wait
  job sauto 0 0-15 150 $P --out $OUT/results/sauto; wait
  job sauto_dg 0 0-15 $((500 - SECONDS)) env RANNC_HF_OFFLOAD_DEVICE_GRADS=1 $P --out $OUT/results/sauto_dg; wait ) &
( job check 1 16-31 150 python3 benchmarks/offload_gpu_check.py; wait
  job ds3 1 16-31 200 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
  job s12 1 16-31 $((500 - SECONDS)) env RANNC_HF_OFFLOAD_STREAM_STEP=12 $P --out $OUT/results/s12; wait ) &
wait
cat "$OUT/logs/summary.txt"; grep -h "OK\|FAIL" $OUT/logs/check.log | tail -40; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json,sys; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'cpu_step %.3f fold %.3f h2d %.1f d2h %.1f' % (e.get('step_time_s',0), e.get('grad_reduce_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']], [round(x,3) for x in r['losses']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
