#!/bin/bash
# H200 x1, ~9 min, every job alone (seventh session, call 1): step_in_backward (each block steps as its last gradient
# arrives in backward). 1. CUDA check of step_in_backward (offload_module and RanncModule, no clipping);
# 2. GPT-2 2.7B under 24 GiB with step_in_backward (auto GPU-stepped blocks); 3. the same with 10 GPU-stepped blocks;
# 4. DeepSpeed ZeRO-3 offload (its anchor config does not clip either), same call; 5. ours as before (clip 1.0).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 5 --warmup 2"
job check 0 0-15 100 python3 benchmarks/offload_gpu_check.py --in-backward-only; wait
job sib 0 0-15 100 $P --step-in-backward --out $OUT/results/sib; wait
job sib10 0 0-15 100 $P --step-in-backward --gpu-step-blocks 10 --out $OUT/results/sib10; wait
job ds3 0 0-15 170 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job s0 0 0-15 $((555 - SECONDS)) $P --out $OUT/results/s0; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|OK" $OUT/logs/check.log | tail -30; cat $OUT/results/*.jsonl
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']], [round(x,3) for x in r['losses']])"; done
for n in sib sib10 s0; do tail -3 $OUT/logs/$n.log; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
