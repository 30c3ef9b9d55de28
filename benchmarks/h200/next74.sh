#!/bin/bash
# H200 x1, ~5 min (nineteenth session): the GPT recipe's default command after batches stopped being pinned by
# default (next72-73: the pin-memory thread halved the offload engine's CPU step), the loop and RanncTrainer in the
# same call, 40 steps each, every job alone.
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 1 --no_plot --max_steps 40"
job gpt_loop 0 0-15 190 python3 $R --output_dir /tmp/recipes/gpt-loop; wait
[ $((330 - SECONDS)) -gt 90 ] && job gpt_trainer 0 0-15 $((330 - SECONDS)) python3 $R --trainer --output_dir /tmp/recipes/gpt-trainer; wait
for d in gpt-loop gpt-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for j in gpt_loop gpt_trainer; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
