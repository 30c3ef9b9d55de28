#!/bin/bash
# H200 x1, ~9.5 min (eighteenth session; carry .whl). next69 confirmed the GIL cost of the step worker on the H200
# host: a 12.6M-parameter block step 2.0 ms alone, 14.3 beside a Python-busy thread (the worker waits up to the
# 5 ms switch interval to take the GIL back after each torch call); the GPT recipe loop still 454.3 ms (CPU-stepped
# blocks 76.5 ms) against RanncTrainer 385.3 (27.1). The engine now lowers the switch interval to 0.5 ms while its
# worker runs (rannc_hf/offload/switch_interval.py). 1. the block step at 5 / 0.5 / 0.2 ms; 2. the recipe loop and
# Trainer at the new default; 3. the loop at 0.2 ms (RANNC_HF_OFFLOAD_SWITCH_US=200), 30 steps.
source "$(dirname "$0")/lib.sh"
job gil 0 0-15 70 python3 benchmarks/host_step_gil.py --out $OUT/results --label "h200 host" --switch_us 5000,500,200; wait
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
job gpt_loop 0 0-15 240 python3 $R --max_steps 60 --output_dir /tmp/recipes/gpt-loop; wait
job gpt_trainer 0 0-15 150 python3 $R --max_steps 60 --trainer --output_dir /tmp/recipes/gpt-trainer; wait
RANNC_HF_OFFLOAD_SWITCH_US=200 job gpt_loop200 0 0-15 $((565 - SECONDS)) python3 $R --max_steps 30 --output_dir /tmp/recipes/gpt-loop200; wait
for d in gpt-loop gpt-trainer gpt-loop200; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; grep -a "params" $OUT/logs/gil.log
for j in gpt_loop gpt_trainer gpt_loop200; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-300; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
