#!/bin/bash
# H200 x2, call 2: the offload engine (issue 4) on GPU 0 and its peers on GPU 1, at the same time
# (each on its own 16 cores; see machine.txt for the NUMA layout).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
job offload_gpt 0 0-15 560 python3 benchmarks/offload_gpt.py --cases optimizer:1:12,optimizer:1:16,all:1:16,optimizer:8:12 --warmup 1 --steps 3 --out $OUT/results/offload_gpt_h200_v2.json
job offload_peers 1 16-31 560 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py plain ds3 fsdp2off
wait
cat "$OUT/logs/summary.txt"
