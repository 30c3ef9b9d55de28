#!/bin/bash
# H200 x2, the next session's second call (~9.5 min): GPT-2 2.7B under 24 GiB through RanncModule with the current
# default (fenced recompute segments eager) on GPU 0 and DeepSpeed ZeRO-3 offload on GPU 1 (issue 4: 1.85x with
# the compiled segments), then on GPU 0 the same model with 64k tokens per step (8 micro-batches summed on the GPU)
# against plain PyTorch uncapped at accumulation 8 on GPU 1 (issue 4's 0.8x target; the engine alone reached 0.59x).
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
( job rannc_2p7b 0 0-15 240 python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --steps 6 --warmup 2 --out $OUT/results/rannc_2p7b; wait
  job rannc_2p7b_acc8 0 0-15 $((555 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --batch 64 --microbatches 8 --no-profile --steps 3 --warmup 1 --out $OUT/results/rannc_2p7b_acc8; wait ) &
( job ds3 1 16-31 240 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
  job plain_acc8 1 16-31 $((555 - SECONDS)) python3 benchmarks/offload_gpt.py --cases plain:8 --warmup 1 --steps 3 --out $OUT/results/plain_acc8.json; wait ) &
wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
