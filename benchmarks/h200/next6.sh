#!/bin/bash
# H200 x2, ~8 min (sixth session, first call). GPU 0: was the drift of compiled checkpointed segments holding
# offload fences the open-block race fixed last session? GPT-2 1.3B, params offload, 1 micro-batch of 8, 30 steps,
# RANNC_HF_COMPILE_FENCED_SEGMENTS=1, guarded (today's code) then RANNC_HF_UNGUARDED_OPEN_BLOCKS=1, then the tiny
# repro with fences synchronized. GPU 1: the plain curve of the same batches (the reference), the PCIe/CPU/GPU
# optimizer rates that decide the streamed step, GPT-2 1.3B under 24 GiB with the planner's plan and with one
# micro-batch (eager), and GPT-2 2.7B compiled fenced segments (timing if the drift is gone).
source "$(dirname "$0")/lib.sh"
P="python3 benchmarks/offload_profile.py"
D="$P rannc --offload params --microbatches 1 --no-profile --steps 30 --warmup 0"
( job drift_guarded 0 0-15 200 env RANNC_HF_COMPILE_FENCED_SEGMENTS=1 $D --out $OUT/results/guarded; wait
  job drift_unguarded 0 0-15 200 env RANNC_HF_COMPILE_FENCED_SEGMENTS=1 RANNC_HF_UNGUARDED_OPEN_BLOCKS=1 $D --out $OUT/results/unguarded; wait
  job repro_sync 0 0-15 $((470 - SECONDS)) env RANNC_HF_COMPILE_FENCED_SEGMENTS=1 python3 benchmarks/drift/repro_fenced_compile.py --steps 10 --layers 10 --offload all --prefetch 1 --clip 1 --precision bf16 --sync-fences; wait ) &
( job plain 1 16-31 120 $P plain --no-profile --steps 30 --warmup 0 --out $OUT/results/plain; wait
  job rates 1 16-31 90 python3 benchmarks/h200/rates.py; wait
  job mb_plan 1 16-31 100 $P rannc --no-profile --steps 5 --warmup 1 --out $OUT/results/mb_plan; wait
  job mb1 1 16-31 100 $P rannc --no-profile --steps 5 --warmup 1 --microbatches 1 --out $OUT/results/mb1; wait
  job c2p7b 1 16-31 $((470 - SECONDS)) env RANNC_HF_COMPILE_FENCED_SEGMENTS=1 $P rannc --model 2.7b --no-profile --steps 6 --warmup 2 --out $OUT/results/c2p7b; wait ) &
wait
cat "$OUT/logs/summary.txt"; tail -3 $OUT/logs/rates.log; grep -h "^losses" $OUT/logs/*.log | cut -c1-300
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
