#!/bin/bash
# H200 x1, ~2.5 min (thirteenth session): one profiled step of GPT-2 1.3B under 24 GiB at 8 micro-batches of 1
# (711 ms, host enqueue 560 ms, GPU compute priced at 172 ms): what the main thread does (trace_gaps summary,
# profiler tables by host op).
source "$(dirname "$0")/lib.sh"
job gpt_m8 0 0-15 150 python3 benchmarks/offload_profile.py rannc --batch 8 --microbatches 8 --steps 3 --warmup 2 --out $OUT/results/gpt_m8; wait
cat "$OUT/logs/summary.txt"; grep -v "^\s" $OUT/logs/gpt_m8.log | tail -80
python3 benchmarks/trace_gaps.py $OUT/results/gpt_m8/trace_rannc.json.gz --json $OUT/results/gpt_m8/gaps.json | head -60
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
