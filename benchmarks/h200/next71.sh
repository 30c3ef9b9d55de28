#!/bin/bash
# H200 x1, ~6 min (eighteenth session; carry .whl). next70: the 0.5 ms GIL switch interval cut the block step beside a
# Python-busy thread from 13.8 to 3.4 ms on this host, but the GPT recipe loop stayed at 447.1 ms with CPU-stepped
# blocks of 75.9 ms (Trainer 382.4, 26.8), and 0.2 ms made the loop's blocks slower (112.4 ms). The engine now counts
# the part of a CPU-stepped block's step spent refilling its GPU working copy (a resident block's new weights:
# fp32 pieces to the device and cast there): the loop and the Trainer again, 60 steps each.
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
job gpt_loop 0 0-15 240 python3 $R --max_steps 60 --output_dir /tmp/recipes/gpt-loop; wait
job gpt_trainer 0 0-15 $((400 - SECONDS)) python3 $R --max_steps 60 --trainer --output_dir /tmp/recipes/gpt-trainer; wait
for d in gpt-loop gpt-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for j in gpt_loop gpt_trainer; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
