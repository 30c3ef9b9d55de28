#!/bin/bash
# H200 x1, ~8 min, every job alone (sixteenth session; carry .whl). Why is the BERT-large recipe loop slower than
# the same plan in offload_profile (next61: loop 121.8 ms/step, Trainer 105.2, offload_profile 86-91, predicted
# 74.6)? The loop's batches were pageable and copied with non_blocking=False (a host stall per batch) and the
# collator ran on the training process. Each loop run traces steps 20-22 with torch.profiler (--profile_steps).
#   loop_nopin: the old behaviour (--no-dataloader_pin_memory); loop_pin: the new default (pinned, non-blocking);
#   loop_workers: pinned + 2 collator processes; trainer: the Trainer path profiled; ref: offload_profile.
source "$(dirname "$0")/lib.sh"
R="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 60 --log_every 10 --eval_every 0 --profile_steps 3 --profile_start 20"
job ref 0 0-15 150 python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --padded --decay-groups --no-profile --out $OUT/results/offload_profile_bert.json; wait
job loop_nopin 0 0-15 130 python3 $R --no-dataloader_pin_memory --output_dir /tmp/recipes/nopin; wait
job loop_pin 0 0-15 120 python3 $R --output_dir /tmp/recipes/pin; wait
job loop_workers 0 0-15 120 python3 $R --dataloader_num_workers 2 --output_dir /tmp/recipes/workers; wait
job trainer 0 0-15 $((570 - SECONDS)) python3 $R --trainer --output_dir /tmp/recipes/trainer; wait
for d in nopin pin workers trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json,profile} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for n in ref loop_nopin loop_pin loop_workers trainer; do echo "== $n"; grep -a -E "^Plan|step time|ms/step|tok/s|predicted step|eval_loss|rannc stats|Traceback|Error" $OUT/logs/$n.log | grep -v Warn | tail -8 | cut -c1-300; done
for d in nopin pin workers trainer; do echo "== profile $d"; sed -n 1,14p /tmp/recipes/$d/profile/steps_20-22.txt 2>/dev/null; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
