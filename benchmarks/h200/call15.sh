#!/bin/bash
# H200 x2, the fourth session's last call (~3.5 min): the GPT recipe trained far worse with the params plan of
# call 9 (eval 7.07 @100) than without offload (call 12: 6.27 @100). Same learnable batches as call 11's plain
# curve, params offload, one micro-batch of 8 (the call-9 plan), compiled on GPU 0 and eager on GPU 1.
source "$(dirname "$0")/lib.sh"
job params_compiled 0 0-15 190 env OFFLOAD=params MICROBATCHES=1 python3 benchmarks/offload_profile.py rannc --no-profile --steps 30 --warmup 0 --out $OUT/results/params_compiled
job params_eager 1 16-31 190 env OFFLOAD=params MICROBATCHES=1 python3 benchmarks/offload_profile.py rannc-eager --no-profile --steps 30 --warmup 0 --out $OUT/results/params_eager
wait
cat "$OUT/logs/summary.txt"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
