#!/bin/bash
# H200 x1, ~6 min, every job alone (for the seventh session: benchmarks/README.md item 2): 64k tokens per optimizer
# step, plain PyTorch uncapped at accumulation 8 without recompute (first: it was cut off in next9.sh), then ours
# under 24 GiB (8 micro-batches of 8; 11,947 tokens/s in the sixth session).
source "$(dirname "$0")/lib.sh"
job plain8 0 0-15 200 python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
job acc8 0 0-15 $((420 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --batch 64 --microbatches 8 --steps 2 --warmup 1 --out $OUT/results/acc8; wait
cat "$OUT/logs/summary.txt"; cat $OUT/results/plain8.json 2>/dev/null | head -40
python3 -c "
import json; r=json.load(open('$OUT/results/acc8/offload_profile_rannc.json')); print('acc8 step %.3f tok/s %.0f pred %.3f' % (r['step_time_s'], r['tokens_per_s'], r['predicted_step_time_s']))"
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
