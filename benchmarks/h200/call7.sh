#!/bin/bash
# H200 x2, session 2026-11-30b call 2: offload cases with more GPU-stepped blocks and accumulation 8, with plain
# PyTorch uncapped at accumulation 8, on GPU 0 (issue 4); DeepSpeed ZeRO-3 offload in the same call, then the
# Trainer's no-offload scenarios at 120 steps, on GPU 1 (issue 6).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
job offload_gpt 0 0-15 530 python3 benchmarks/offload_gpt.py --cases all:1:20,all:1:24,all:8:20,plain:8 --warmup 1 --steps 3 --out $OUT/results/offload_gpt_h200_v4.json
( job offload_peers 1 16-31 280 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
  job trainer 1 16-31 240 python3 benchmarks/trainer_gpu.py --scenarios loop,trainer --steps 120 --warmup 20 --out $OUT/results; wait ) &
wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
