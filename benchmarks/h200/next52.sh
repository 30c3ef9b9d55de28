#!/bin/bash
# H200 x1, ~7 min, every job alone (thirteenth session). The flat CPU AdamW step (offload/flat_step.py) against the
# per-parameter one, and the worker's thread count: fused AdamW over a BERT-large layer beside a busy Python thread
# and DMA at 8-16 threads; BERT-large with optimizer offload forced under 24 GiB (flat off / on, on at 12 and 8
# threads); GPT-2 1.3B's offload default (step_in_backward) flat off / on.
source "$(dirname "$0")/lib.sh"
job adam 0 0-15 60 python3 benchmarks/h200/adam_shapes.py --layers bert_layer,gpt2_1.3b_layer --flat 0,1 --loads python+dma --threads 8,12,14,15,16; wait
B="python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 8 --warmup 3 --offload optimizer --no-profile"
RANNC_HF_OFFLOAD_FLAT_STEP=0 job bert_split 0 0-15 70 $B --out $OUT/results/bert_split; wait
job bert_flat 0 0-15 70 $B --out $OUT/results/bert_flat; wait
RANNC_HF_OFFLOAD_CPU_THREADS=12 job bert_flat_t12 0 0-15 70 $B --out $OUT/results/bert_flat_t12; wait
RANNC_HF_OFFLOAD_CPU_THREADS=8 job bert_flat_t8 0 0-15 70 $B --out $OUT/results/bert_flat_t8; wait
G="python3 benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 5 --warmup 2"
RANNC_HF_OFFLOAD_FLAT_STEP=0 job gpt_split 0 0-15 100 $G --out $OUT/results/gpt_split; wait
job gpt_flat 0 0-15 $((570 - SECONDS)) $G --out $OUT/results/gpt_flat; wait
cat "$OUT/logs/summary.txt"; grep '^{' $OUT/logs/adam.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f')); w=[x for x in r.get('worker_log', []) if x[0]=='step']
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f cpu_step/step %.4f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0), r['engine_per_step'].get('step_time_s',0)), [round(x,3) for x in r['step_times_s']], 'worker steps ms', [round((x[4]-x[3])*1e3,1) for x in w][:10])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
