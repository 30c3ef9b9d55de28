#!/bin/bash
# H200 x1, ~6 min, every job alone (thirteenth session): gradients queued per block and sent with one stream switch
# and one foreach norm (gradients.py _flush_pending) instead of a norm, a wait and a switch each. The whole CUDA check
# first; then A/B against the commit before it (ab_old/, the flat step already in both), one after the other:
# BERT-large with optimizer offload forced (1 x 32) and GPT-2 1.3B's offload default.
source "$(dirname "$0")/lib.sh"
job check 0 0-15 150 python3 benchmarks/offload_gpu_check.py; wait
B="benchmarks/offload_profile.py rannc --model bert-large --batch 32 --steps 8 --warmup 3 --offload optimizer --no-profile"
G="benchmarks/offload_profile.py rannc --step-in-backward --no-profile --steps 5 --warmup 2"
ab() {  # NAME DIR TIMEOUT args...
  local name=$1 dir=$2 to=$3; shift 3
  ( cd $dir && CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD:/tmp/site timeout $to taskset -c 0-15 python3 "$@" --out $OUT/results/$name > $OUT/logs/$name.log 2>&1; echo "[$name] rc=$? ${SECONDS}s" >> $OUT/logs/summary.txt )
}
ab bert_old ab_old 60 $B; ab bert_new . 60 $B; ab bert_old2 ab_old 60 $B; ab bert_new2 . 60 $B
ab gpt_old ab_old 100 $G; ab gpt_new . $((560 - SECONDS)) $G
cat "$OUT/logs/summary.txt"; grep "FAIL\|ALL OK\|SOME" $OUT/logs/check.log | tail -5; grep -c " OK" $OUT/logs/check.log
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
