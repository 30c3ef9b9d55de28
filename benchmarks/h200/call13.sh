#!/bin/bash
# H200 x2 (GPU 0 only, nothing beside it), the fourth 2026-11-30 session's third call (~5.5 min): GPT-2 1.3B under
# 24 GiB through RanncModule, optimizer offload, 1 micro-batch of 8 with recompute vs the planner's new choice of
# 4 micro-batches of 2 summed on the GPU: call 12 timed the latter at 0.7-1.07 s/step beside another offloaded job.
source "$(dirname "$0")/lib.sh"
job mb1 0 0-15 165 env MICROBATCHES=1 python3 benchmarks/offload_profile.py rannc --no-profile --steps 10 --warmup 2 --out $OUT/results/mb1; wait
job mb4 0 0-15 $((330 - SECONDS)) env MICROBATCHES=4 python3 benchmarks/offload_profile.py rannc --no-profile --steps 10 --warmup 2 --out $OUT/results/mb4; wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
