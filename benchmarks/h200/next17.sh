#!/bin/bash
# H200 x1, ~9 min, every job alone (for the eighth session: benchmarks/README.md item 2). 64k tokens per step: ours
# with step_in_backward and the planner choosing the micro-batches (it was fixed at 8 of 8), then plain PyTorch
# uncapped, accumulation 8, without recompute (cut off by call limits twice: it goes first with a wide limit).
source "$(dirname "$0")/lib.sh"
job plain8 0 0-15 300 python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
job acc 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --step-in-backward --batch 64 --steps 2 --warmup 1 --out $OUT/results/acc; wait
cat "$OUT/logs/summary.txt"; grep -h "tokens_per_s\|step_time_s" $OUT/results/plain8.json | head
grep -h "^Plan\|^0 \|predicted" $OUT/logs/acc.log | head; tail -3 $OUT/logs/acc.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
