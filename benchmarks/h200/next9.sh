#!/bin/bash
# H200 x1, ~7 min, every job alone (sixth session, fourth call). New since call 3: a CPU-stepped block's bf16 shadow is
# no longer recast on the host after its step; its next fetch sends the fp32 master, casts on the GPU and writes the
# shadow back on the copy-out stream (the CPU-bound step spent ~27% of each block there). Streaming off (default 0).
# 1. CUDA correctness check; 2. GPT-2 2.7B under 24 GiB; 3. DeepSpeed ZeRO-3 offload, same model and batch;
# 4. 64k tokens per step (8 micro-batches of 8) under 24 GiB; 5. plain PyTorch uncapped, accumulation 8, no recompute.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile"
job check 0 0-15 80 python3 benchmarks/offload_gpu_check.py; wait
job s0 0 0-15 110 $P --steps 6 --warmup 2 --out $OUT/results/s0; wait
job ds3 0 0-15 170 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job acc8 0 0-15 $((400 - SECONDS)) $P --batch 64 --microbatches 8 --steps 2 --warmup 1 --out $OUT/results/acc8; wait
job plain8 0 0-15 $((450 - SECONDS)) python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -20; cat $OUT/results/*.jsonl; tail -5 $OUT/logs/plain8.log
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json,sys; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'cpu_step %.3f fold %.3f h2d %.1f d2h %.1f hidden %.3f' % (e.get('step_time_s',0), e.get('grad_reduce_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9, e.get('hidden_fraction',0)), [round(x,3) for x in r['step_times_s']], [round(x,3) for x in r['losses']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
