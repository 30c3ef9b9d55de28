#!/bin/bash
# H200 x1, ~8 min (seventeenth session; carry .whl). next66 found the GPT recipe's loop at 813-818 ms a step, its
# CPU-stepped blocks 75 ms each: the step worker ran on one core, having taken torch's thread count from the
# pin-memory thread (a thread's first parallel op reads the count any thread set last). With the worker's count
# pinned and the rest group stepped on the worker: the loop (GPU pipe queued first), the loop with the old order
# (RANNC_HF_OFFLOAD_REST_FIRST=1), and RanncTrainer (391 ms in next66).
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
job gpt_loop 0 0-15 260 python3 $R --max_steps 60 --output_dir /tmp/recipes/gpt-loop; wait
RANNC_HF_OFFLOAD_REST_FIRST=1 job gpt_rest_first 0 0-15 $((390 - SECONDS)) python3 $R --max_steps 40 --output_dir /tmp/recipes/gpt-rest-first; wait
job gpt_trainer 0 0-15 $((540 - SECONDS)) python3 $R --max_steps 60 --trainer --output_dir /tmp/recipes/gpt-trainer; wait
for d in gpt-loop gpt-rest-first gpt-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for j in gpt_loop gpt_rest_first gpt_trainer; do echo "== $j"; grep -a -E "predicted step|step  *[0-9]+  loss|'loss'|rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -6 | cut -c1-300; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
