#!/bin/bash
# H200 x1, ~9.5 min (nineteenth session). next72 found the loop's CPU-stepped blocks at 29.0 ms (the Trainer 26.9):
# the 76-79 ms of next69-71 came from the summary being taken after the final evaluation (one-off ~19 s of block-step
# wall time in its tail). It also found the loop without pinned batches at 18.1 ms a block (396.9 ms a step against
# 407.8 pinned). This call repeats that A/B in both paths: 1. the Trainer without pinned batches (next72: 385.9 ms
# pinned); 2-3. the loop without and with pinned batches; 4. if time is left, the BERT recipe with optimizer offload
# through the loop, the host-bound case the 0.5 ms switch interval has not been measured on (150.4 ms at 57d59fb).
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 1 --no_plot --max_steps 40"
B="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 1 --no_plot"
job gpt_trainer_nopin 0 0-15 230 python3 $R --trainer --no-dataloader_pin_memory --output_dir /tmp/recipes/gpt-trainer-nopin; wait
job gpt_loop_nopin 0 0-15 140 python3 $R --no-dataloader_pin_memory --output_dir /tmp/recipes/gpt-loop-nopin; wait
job gpt_loop_pin 0 0-15 140 python3 $R --output_dir /tmp/recipes/gpt-loop-pin; wait
[ $((550 - SECONDS)) -gt 80 ] && job bert_opt 0 0-15 $((550 - SECONDS)) env RANNC_HF_OFFLOAD=optimizer python3 $B --max_steps 100 --output_dir /tmp/recipes/bert-opt; wait
for d in gpt-trainer-nopin gpt-loop-nopin gpt-loop-pin bert-opt; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for j in gpt_trainer_nopin gpt_loop_nopin gpt_loop_pin bert_opt; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
