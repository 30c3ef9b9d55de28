#!/bin/bash
# H200 x1, ~9 min (seventeenth session; carry .whl). next67: with the step worker's thread count fixed the GPT
# recipe's loop ran 446 ms, RanncTrainer 394, but the loop's CPU-stepped blocks took 67.5 ms each against the
# Trainer's 28.1 (the rest group, on the same worker while the main thread waits: 35-45 ms in both). 16 threads on
# 16 cores collapse beside busy threads (next51/52: 8-15 threads ran 1.8-6.6e9 where 16 fell to 0.1-1.6e9); the
# loop has more of them (the pin-memory thread, accelerate's prefetch). The engine's thread count, swept:
# the loop at 14 and 12 threads, RanncTrainer at 14, a GPT-2 1.3B layer flat beside both loads at 12-16.
source "$(dirname "$0")/lib.sh"
job adam_layer 0 0-15 40 python3 benchmarks/h200/adam_shapes.py --layers gpt2_1.3b_layer --flat 1 --loads python+dma --threads 12,14,15,16 --grad-scale; wait
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 4 --no_plot"
RANNC_HF_OFFLOAD_CPU_THREADS=14 job gpt_loop14 0 0-15 250 python3 $R --max_steps 50 --output_dir /tmp/recipes/gpt-loop14; wait
RANNC_HF_OFFLOAD_CPU_THREADS=12 job gpt_loop12 0 0-15 $((400 - SECONDS)) python3 $R --max_steps 40 --output_dir /tmp/recipes/gpt-loop12; wait
RANNC_HF_OFFLOAD_CPU_THREADS=14 job gpt_trainer14 0 0-15 $((545 - SECONDS)) python3 $R --max_steps 40 --trainer --output_dir /tmp/recipes/gpt-trainer14; wait
for d in gpt-loop14 gpt-loop12 gpt-trainer14; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; cut -c1-200 $OUT/logs/adam_layer.log
for j in gpt_loop14 gpt_loop12 gpt_trainer14; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-300; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
