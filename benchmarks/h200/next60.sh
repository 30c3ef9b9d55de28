#!/bin/bash
# H200 x1, ~9 min, every job alone (fifteenth session; carry .whl: datasets, dill, multiprocess). The BERT-large
# recipe under 24 GiB now that compile: auto compiles encoders (captured graph): the default plan through
# RanncTrainer (--trainer), 200 steps with evals at 100 and 200 (eager references: 134k tokens/s, eval 7.02 @200
# without offload; 67k / 7.04 with optimizer offload); then BERT-large with optimizer offload forced, compiled and
# profiled (where the host-bound step spends its time); then the recipe with optimizer offload forced, loop path.
source "$(dirname "$0")/lib.sh"
R="recipes/bert/pretrain.py --model_config bert-large --seq_len 512 --per_device_batch_size 32 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --max_steps 200 --log_every 10"
job recipe_default 0 0-15 270 python3 $R --trainer --eval_every 100 --output_dir /tmp/recipes/bert-default; wait
job profile_opt 0 0-15 110 python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 6 --warmup 3 --offload optimizer --out $OUT/results/profile_opt; wait
job recipe_opt 0 0-15 $((565 - SECONDS)) env RANNC_HF_OFFLOAD=optimizer python3 $R --eval_every 0 --output_dir /tmp/recipes/bert-opt; wait
for d in bert-default bert-opt; do mkdir -p $OUT/recipes/$d; cp /tmp/recipes/$d/{history.json,rannc_stats.json,loss.png} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; grep -i "pip\|error" $OUT/logs/pip.log | head -3
for n in recipe_default recipe_opt; do echo "== $n"; grep -i -E "plan|eval|tokens/s|compile|Traceback|Error" $OUT/logs/$n.log | grep -v Warn | tail -14; done
grep -E "step|enq|self" $OUT/logs/profile_opt.log | head -30
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
