#!/bin/bash
# H200 x1, ~4 min (the fifth session's last device minutes): GPT-2 1.3B under 24 GiB through RanncModule, GPU
# alone: the 8 micro-batches of 1 the planner picks now (the recipe: 856 ms against 580 predicted, beside another
# job) and one micro-batch of 8 with recompute (602 ms compiled in call 13; fenced segments now eager).
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py rannc --no-profile --steps 5 --warmup 1"
job mb8 0 0-15 120 $P --microbatches 8 --out $OUT/results/mb8; wait
job mb1 0 0-15 $((235 - SECONDS)) $P --microbatches 1 --out $OUT/results/mb1; wait
cat "$OUT/logs/summary.txt"; grep -h "step times\|predicted" $OUT/logs/mb*.log | head
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
