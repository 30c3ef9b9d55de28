#!/bin/bash
# H200 x1, ~9 min (for the eleventh session: benchmarks/README.md item 3). The largest GPT one level up: 42 layers
# of d 5120 (13.5B parameters), on one repeated batch so the loss visibly falls over 16 steps. If it does not run,
# the 40-layer 12.85B (measured with 4 random batches in the fifth session) on the repeated batch instead.
source "$(dirname "$0")/lib.sh"
L="python3 benchmarks/offload_largest.py --repeat-batch --out $OUT/results"
job largest42 0 0-15 380 $L --layers 42 --steps 16; wait
if ! grep -q "rc=0 " "$OUT/logs/summary.txt"; then
  job largest40 0 0-15 $((560 - SECONDS)) $L --layers 40 --steps 12; wait
fi
cat "$OUT/logs/summary.txt"; tail -n 40 $OUT/logs/largest4*.log | grep -v "^\s*$" | grep -iv "warn" | tail -60
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
