#!/bin/bash
# H200 x1, ~4 min (sixteenth session; carry .whl). The BERT-large recipe through RanncTrainer after
# RanncTrainingArguments stopped defaulting to logging_nan_inf_filter (two device syncs a step): next63 ran it at
# 105.7 ms/step against the loop's 92.3 with the same plan and collator workers. Steps 20-22 traced.
source "$(dirname "$0")/lib.sh"
R="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --log_every 10"
job trainer_default 0 0-15 400 python3 $R --trainer --eval_every 100 --profile_steps 3 --profile_start 20 --output_dir /tmp/recipes/bert-trainer; wait
for d in bert-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json,profile} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
grep -a -E "^Plan|predicted step|eval_loss|rannc stats|Traceback|Error" $OUT/logs/trainer_default.log | grep -v Warn | tail -7 | cut -c1-300
sed -n 1,10p /tmp/recipes/bert-trainer/profile/steps_20-22.txt
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
