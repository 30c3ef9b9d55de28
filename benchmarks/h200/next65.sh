#!/bin/bash
# H200 x1, ~5 min (sixteenth session; carry .whl). The GPT-2 1.3B recipe under 24 GiB alone on the machine, with the
# recipes' collator workers, 60 steps, steps 20-22 traced (its last 200-step run, 9.6k tokens/s, shared the host).
source "$(dirname "$0")/lib.sh"
job gpt_loop 0 0-15 290 python3 recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 60 --log_every 10 --eval_every 0 --eval_batches 4 --profile_steps 3 --profile_start 20 --output_dir /tmp/recipes/gpt-loop; wait
mkdir -p $OUT/recipes/gpt-loop; cp -r /tmp/recipes/gpt-loop/{history.json,rannc_stats.json,profile} $OUT/recipes/gpt-loop/ 2>/dev/null
cat "$OUT/logs/summary.txt"
grep -a -E "^Plan|predicted step|step  *[0-9]+  loss|eval_loss|rannc stats|Traceback|Error" $OUT/logs/gpt_loop.log | grep -v Warn | tail -12 | cut -c1-300
sed -n 1,10p /tmp/recipes/gpt-loop/profile/steps_20-22.txt
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
