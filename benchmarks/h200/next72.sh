#!/bin/bash
# H200 x1, ~9.5 min (written in the eighteenth session, not yet run; carry .whl). The GPT recipe's 7 CPU-stepped blocks
# take 76-79 ms each through the accelerate loop and 26-27 ms through RanncTrainer (same plan and call; next69-71).
# Ruled out: the step worker's thread count (16 in both), the GIL (a 0.5 ms switch interval: 75.9 ms; 0.2 ms: 112.4),
# refilling a GPU copy (0.0 ms of it). One difference found afterwards: the loop's AdamW left the kernel to torch
# (foreach on the GPU-stepped blocks) where the Trainer's default is fused; the loop is now fused on a GPU too.
# 1-2. the loop (fused now) and the Trainer profiled at steps 20-21 (torch.profiler CPU+CUDA: what the main thread
# and the DMA do while the worker steps; the Chrome traces come back); 3. the loop with --no-adam_fused (as in
# next69-71); 4. the loop without pinned batches (no pin-memory thread), if time is left. 0. first, the CUDA check of
# the user's fused AdamW through the engine with a reload of its state (a resume's step counts now go to the GPU).
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_every 0 --eval_batches 2 --no_plot"
P="--profile_steps 2 --profile_start 20"
job check 0 0-15 60 python3 benchmarks/offload_gpu_check.py --user-fused-only; wait
job gpt_loop 0 0-15 230 python3 $R --max_steps 40 $P --output_dir /tmp/recipes/gpt-loop; wait
job gpt_trainer 0 0-15 130 python3 $R --max_steps 40 $P --trainer --output_dir /tmp/recipes/gpt-trainer; wait
job gpt_foreach 0 0-15 110 python3 $R --max_steps 40 --no-adam_fused --output_dir /tmp/recipes/gpt-foreach; wait
[ $((560 - SECONDS)) -gt 90 ] && job gpt_nopin 0 0-15 $((560 - SECONDS)) python3 $R --max_steps 40 --no-dataloader_pin_memory --output_dir /tmp/recipes/gpt-nopin; wait
for d in gpt-loop gpt-trainer gpt-foreach gpt-nopin; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json,profile} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"; grep -a "OK\|FAIL" $OUT/logs/check.log | tail -6
for j in gpt_loop gpt_trainer gpt_foreach gpt_nopin; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
