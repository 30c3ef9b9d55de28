#!/bin/bash
# H200 x1, ~8 min, every job alone (ninth session, call 2). 64k tokens per step without recompute, 32 micro-batches
# of 2 (the mb1 run's peak was 18.2 GiB: one more sample's activations fit): the CPU stepping every block, and 14
# blocks' state streamed through the GPU; plain PyTorch accumulation 8 of 8 uncapped as the peer.
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --microbatches 32 --offload optimizer --recompute none --step-in-backward --gpu-step-blocks 0 --mem-margin 0.03 --no-profile --steps 3 --warmup 1"
E="env RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE=1 RANNC_HF_OFFLOAD_GPU_STEP_REST=0"
job mb2 0 0-15 210 $E $P --out $OUT/results/mb2; wait
job mb2s 0 0-15 190 $E RANNC_HF_OFFLOAD_STREAM_STEP=14 $P --out $OUT/results/mb2s; wait
job plain8 0 0-15 $((545 - SECONDS)) python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
cat "$OUT/logs/summary.txt"; grep -h "tokens/s" $OUT/logs/plain*.log
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
for f in $OUT/logs/mb2*.log; do grep -h "^Plan\|^0 \|Error\|error" $f | head -6; tail -3 $f; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
