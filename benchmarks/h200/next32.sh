#!/bin/bash
# H200 x1, ~5 min (tenth session): the kernels of eager BERT-large and GPT-2 1.3B by the aten op that launched
# them, and both models' compiled step time, to refit the analytic model where it misses BERT-large (-20%).
source "$(dirname "$0")/lib.sh"
job costs 0 0-15 $((330 - SECONDS)) env OUT=$OUT/results python3 benchmarks/cost_breakdown.py --variants bert-large:32 1.3b:16 --compiled; wait
cat "$OUT/logs/summary.txt"; grep -v Warn $OUT/logs/costs.log | tail -5
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
