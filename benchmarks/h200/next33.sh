#!/bin/bash
# H200 x1, ~5 min (tenth session): plain torch.compile ran BERT-large 13% slower than eager (124 vs 110 ms, next32);
# does RanncModule's compiled stage (compile: auto's choice on one GPU) too? Same model and batch, eager and compiled.
source "$(dirname "$0")/lib.sh"
job bert 0 0-15 $((300 - SECONDS)) env RANNC_HF_RESULTS=$OUT/results python3 benchmarks/single_gpu.py --variants rannc:bert-large:32 rannc-compile:bert-large:32 --steps 5 --warmup 2; wait
cat "$OUT/logs/summary.txt"; grep -v Warn $OUT/logs/bert.log | grep -i "tokens/s\|error\|Traceback" | tail -8
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
