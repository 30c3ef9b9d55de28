#!/bin/bash
# H200 x1, ~5 min (written in the nineteenth session, not yet run). Checks the explanation of next69-71's slow blocks:
# block-step counters are wall times, and an evaluation that starts while the last step's CPU-stepped blocks run
# (it compiles its forward again) lengthened them by ~19 s once. With an evaluation every 10 steps the summary's
# block mean should rise well above the 14.6-21.7 ms of runs without one (next73-74); if it does not, the
# explanation is wrong. The second job, in the same call, runs without an evaluation.
source "$(dirname "$0")/lib.sh"
R="recipes/gpt/pretrain.py --model_config gpt2-1.3b --seq_len 1024 --per_device_batch_size 8 --rannc_config recipes/configs/rannc_1gpu_offload.yaml --log_every 10 --eval_batches 1 --no_plot --max_steps 40"
job gpt_eval10 0 0-15 230 python3 $R --eval_every 10 --output_dir /tmp/recipes/gpt-eval10; wait
[ $((330 - SECONDS)) -gt 90 ] && job gpt_noeval 0 0-15 $((330 - SECONDS)) python3 $R --eval_every 0 --output_dir /tmp/recipes/gpt-noeval; wait
for d in gpt-eval10 gpt-noeval; do mkdir -p $OUT/recipes/$d; cp -r /tmp/recipes/$d/{history.json,rannc_stats.json} $OUT/recipes/$d/ 2>/dev/null; done
cat "$OUT/logs/summary.txt"
for j in gpt_eval10 gpt_noeval; do echo "== $j"; grep -a -E "rannc stats|^offload|Traceback|Error" $OUT/logs/$j.log | grep -v Warn | tail -4 | cut -c1-400; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results recipes && rm -rf logs results recipes && mv /tmp/bundle.tgz .
