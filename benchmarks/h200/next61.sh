#!/bin/bash
# H200 x1, ~7 min, every job alone (fifteenth session; carry .whl). After next60: RanncTrainer keeps the YAML's
# precision (the Trainer path had run fp32, 832 ms/step), the stats callback times GPU steps with CUDA events instead
# of two synchronizes a step, and the recipe loop reads its loss at log steps only. The BERT-large recipe under
# 24 GiB: the default plan through RanncTrainer and through the loop, then optimizer offload forced (loop; next60:
# 173.8 ms/step, 94.3k tokens/s).
source "$(dirname "$0")/lib.sh"
R="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --log_every 10"
job trainer_default 0 0-15 200 python3 $R --trainer --eval_every 100 --output_dir /tmp/recipes/bert-trainer; wait
job loop_opt 0 0-15 150 env RANNC_HF_OFFLOAD=optimizer python3 $R --eval_every 0 --output_dir /tmp/recipes/bert-opt; wait
job loop_default 0 0-15 $((560 - SECONDS)) python3 $R --eval_every 100 --output_dir /tmp/recipes/bert-loop; wait
for d in bert-trainer bert-opt bert-loop; do mkdir -p $OUT/recipes/$d; cp /tmp/recipes/$d/{history.json,rannc_stats.json,loss.png} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for n in trainer_default loop_opt loop_default; do echo "== $n"; grep -a -E "^Plan|^0  |predicted step|eval_loss|train_runtime|rannc stats|Traceback|Error" $OUT/logs/$n.log | grep -v Warn | tail -9 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
