#!/bin/bash
# H200 x1, ~9 min, every job alone (eighth session). The rest group (embeddings, final norm) stepped on the GPU
# (gpu_step_rest, chosen by gpu_step_blocks: auto when it fits): 1. its CUDA check (offload_module with clipping,
# RanncModule's modes, step_in_backward); 2. GPT-2 2.7B step_in_backward with the rest on the host
# (RANNC_HF_OFFLOAD_GPU_STEP_REST=0: 779 ms in next16) and 3. as auto chooses; 4. GPT-2 1.3B as auto chooses
# (418 ms in next16); 5. 64k tokens per step as auto chooses (5.58 s before).
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --no-profile --step-in-backward --steps 5 --warmup 2"
job check 0 0-15 150 python3 benchmarks/offload_gpu_check.py --gpu-rest-only; wait
job host 0 0-15 170 env RANNC_HF_OFFLOAD_GPU_STEP_REST=0 $P --model 2.7b --out $OUT/results/host; wait
job gpu 0 0-15 120 $P --model 2.7b --out $OUT/results/gpu; wait
job s13 0 0-15 90 $P --out $OUT/results/s13; wait
job acc 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --step-in-backward --batch 64 --steps 2 --warmup 1 --out $OUT/results/acc; wait
cat "$OUT/logs/summary.txt"; grep -h "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -20
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
