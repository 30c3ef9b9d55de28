#!/bin/bash
# H200 x2, ~7 min (fifth session's last call): GPT-2 2.7B under 24 GiB through RanncModule, the default
# (fenced recompute segments eager: 1099 ms in call 17 against DeepSpeed's 1836 ms, 1.67x) and with GPU-stepped
# blocks keeping their gradients on the GPU (RANNC_HF_OFFLOAD_DEVICE_GRADS=1) on GPU 0; the peers on GPU 1 in
# the same call: DeepSpeed ZeRO-3 offload, then FSDP2 + CPUOffloadPolicy (issue 4: 2x and 4x).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 6 --warmup 2"
( job rannc_2p7b 0 0-15 170 $P --out $OUT/results/rannc_2p7b; wait
  job rannc_2p7b_devgrads 0 0-15 $((400 - SECONDS)) env RANNC_HF_OFFLOAD_DEVICE_GRADS=1 $P --out $OUT/results/rannc_2p7b_devgrads; wait ) &
( job ds3 1 16-31 200 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
  job fsdp2off 1 16-31 $((400 - SECONDS)) env OUT=$OUT/results python3 benchmarks/offload_peers.py fsdp2off; wait ) &
wait
cat "$OUT/logs/summary.txt"; cat $OUT/results/*.jsonl
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
