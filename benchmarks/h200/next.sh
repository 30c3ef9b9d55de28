#!/bin/bash
# H200 x1, the next session's first call (~9 min): the Trainer's offload overhead after the two fixes of the
# third 2026-11-30 session (issue 6: offloaded clip, model.zero_grad() reaching the engine), then GPT-2 1.3B
# trained 30 steps on learnable batches without offload (uncapped) and with offload under 24 GiB, to compare
# the bf16 loss curves (the recipe's loss rose after step 100 with offload; is it the engine?).
source "$(dirname "$0")/lib.sh"
job trainer_offload 0 0-15 240 python3 benchmarks/trainer_gpu.py --scenarios loop_offload,trainer_offload --steps 60 --warmup 10 --out $OUT/results; wait
job curve_plain 0 0-15 170 python3 benchmarks/offload_profile.py plain --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
job curve_offload 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_profile.py rannc --no-profile --steps 30 --warmup 0 --out $OUT/results; wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
