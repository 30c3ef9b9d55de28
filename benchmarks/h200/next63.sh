#!/bin/bash
# H200 x1, ~8 min, every job alone (sixteenth session; carry .whl). After next62 (collating on the training process
# made the BERT-large recipe loop host-bound: 120.5 ms/step with 0 collator workers, 92.2 with 2) the recipes
# collate in 2 workers on a GPU by default. The 200-step runs of next61 again, to compare step time and eval loss:
# loop default (next61: 121.8 ms, eval 7.0963@100, final 7.0188), Trainer default (105.2 ms, final 7.0994) and loop
# with optimizer offload (193.7 ms, final 7.0465). The loop default also traces steps 20-22.
source "$(dirname "$0")/lib.sh"
R="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --log_every 10"
job loop_default 0 0-15 240 python3 $R --eval_every 100 --profile_steps 3 --profile_start 20 --output_dir /tmp/recipes/bert-loop; wait
job trainer_default 0 0-15 150 python3 $R --trainer --eval_every 100 --output_dir /tmp/recipes/bert-trainer; wait
job loop_opt 0 0-15 $((570 - SECONDS)) env RANNC_HF_OFFLOAD=optimizer python3 $R --eval_every 0 --output_dir /tmp/recipes/bert-opt; wait
for d in bert-loop bert-trainer bert-opt; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json,profile} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for n in loop_default trainer_default loop_opt; do echo "== $n"; grep -a -E "^Plan|predicted step|eval_loss|rannc stats|Traceback|Error" $OUT/logs/$n.log | grep -v Warn | tail -7 | cut -c1-300; done
sed -n 1,12p /tmp/recipes/bert-loop/profile/steps_20-22.txt
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
