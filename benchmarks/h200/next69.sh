#!/bin/bash
# H200 x1, ~9.5 min (written in the seventeenth session, not yet run; carry .whl). After next68 the step worker's flat
# step was cut to 2 torch calls a block (each call from the worker waits for the GIL while the main thread runs
# Python; 2 cores: 81.6 -> 27.5 ms beside a Python-busy thread), a later micro-batch's fold to one. 1. that benchmark on the H200 host; 2. the GPT
# recipe through the loop and RanncTrainer (next67: 446.3 and 394.4 ms, CPU-stepped blocks 67.5 and 28.1 ms);
# 3. the CUDA check (every engine path equals plain training in fp32; the flat step now calls the fused kernel).
source "$(dirname "$0")/lib.sh"
job gil 0 0-15 40 python3 benchmarks/host_step_gil.py --out $OUT/results --label "h200 host"; wait
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
job gpt_loop 0 0-15 250 python3 $R --max_steps 60 --output_dir /tmp/recipes/gpt-loop; wait
job gpt_trainer 0 0-15 140 python3 $R --max_steps 60 --trainer --output_dir /tmp/recipes/gpt-trainer; wait
job check 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_gpu_check.py; wait
for d in gpt-loop gpt-trainer; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; head -1 $OUT/logs/gil.log
for j in gpt_loop gpt_trainer; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-300; done
grep "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -5; grep -c " OK" $OUT/logs/check.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
