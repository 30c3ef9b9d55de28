#!/bin/bash
# H200 x1, ~9.5 min (seventeenth session; carry .whl). The GPT-2 1.3B recipe's step after backward (next65: 575 ms
# against 458.5 predicted; its rest group's CPU AdamW 140-157 ms with the GPU idle, 0.7e9 parameters/s):
# 1. the rest group's fused AdamW alone (107.1M parameters, flat, with a grad_scale as clipped) by thread count,
#    alone and beside DMA + a busy Python thread; 2. the recipe with the GPU pipe queued before the rest step and
#    the rest step on the engine's thread count (the summary prints the engine's per-step means and the main
#    thread's own count); 3. the same with RANNC_HF_OFFLOAD_REST_FIRST=1 (the old order); 4. through --trainer.
source "$(dirname "$0")/lib.sh"
job adam_rest 0 0-15 60 python3 benchmarks/h200/adam_shapes.py --layers gpt2_1.3b_rest --flat 1 --loads none,python+dma --threads 1,4,8,16 --grad-scale; wait
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
job gpt_new 0 0-15 270 python3 $R --max_steps 50 --profile_steps 3 --profile_start 20 --output_dir /tmp/recipes/gpt-new; wait
RANNC_HF_OFFLOAD_REST_FIRST=1 job gpt_rest_first 0 0-15 $((440 - SECONDS)) python3 $R --max_steps 40 --output_dir /tmp/recipes/gpt-rest-first; wait
job gpt_trainer 0 0-15 $((570 - SECONDS)) python3 $R --max_steps 40 --trainer --output_dir /tmp/recipes/gpt-trainer; wait
for d in gpt-new gpt-rest-first gpt-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json,profile} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; cat $OUT/logs/adam_rest.log | cut -c1-200
for j in gpt_new gpt_rest_first gpt_trainer; do echo "== $j"; grep -a -E "^Plan|predicted step|step  *[0-9]+  loss|'loss'|rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -9 | cut -c1-300; done
sed -n 1,12p /tmp/recipes/gpt-new/profile/steps_20-22.txt
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
