#!/bin/bash
# H200 x2, the fourth 2026-11-30 session's last call (~5 min): GPT-2-style 2.7B under 24 GiB, micro-batch 8,
# through RanncModule (the planner's plan, with this session's device accumulation) on GPU 0, DeepSpeed ZeRO-3
# with param + optimizer offload on GPU 1, side by side (as call 7 ran the engine alone beside DeepSpeed).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
job rannc_2p7b 0 0-15 330 env MODEL=2.7b python3 benchmarks/offload_profile.py rannc --no-profile --steps 6 --warmup 2 --out $OUT/results/rannc_2p7b
job ds3 1 16-31 330 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3
wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
