#!/bin/bash
# H200 x1, ~8 min, every job alone (ninth session, call 1). 64k tokens per step without recompute: what bounds it.
# Plain PyTorch uncapped, accumulation 8 of 8 (the peer) and 64 of 1 (the per-sample cost of 1-sample micro-batches,
# the only size whose activations fit beside resident bf16 weights and an fp32 device gradient sum under 24 GiB);
# then ours on that path (optimizer offload, no recompute, 64 x 1, sums on the GPU, step in backward), with the CPU
# stepping every block, and with 12 blocks' state streamed through the GPU instead.
source "$(dirname "$0")/lib.sh"
job plain8 0 0-15 200 python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
job plain1 0 0-15 150 python3 benchmarks/offload_gpt.py --cases plain:64 --micro-batch 1 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain1.json; wait
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --microbatches 64 --offload optimizer --recompute none --step-in-backward --gpu-step-blocks 0 --mem-margin 0.03 --no-profile --steps 2 --warmup 1"
E="env RANNC_HF_OFFLOAD_DEVICE_ACCUMULATE=1 RANNC_HF_OFFLOAD_GPU_STEP_REST=0"
job mb1 0 0-15 200 $E $P --out $OUT/results/mb1; wait
job mb1s 0 0-15 $((540 - SECONDS)) $E RANNC_HF_OFFLOAD_STREAM_STEP=12 $P --out $OUT/results/mb1s; wait
cat "$OUT/logs/summary.txt"; grep -h "tokens/s" $OUT/logs/plain*.log
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), [round(x,3) for x in r['step_times_s']])"; done
for f in $OUT/logs/mb1*.log; do grep -h "^Plan\|^0 \|predicted\|Error\|error" $f | head -8; tail -3 $f; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
