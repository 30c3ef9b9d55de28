#!/bin/bash
# H200 x1, ~9.5 min, every job alone (for the eighth session: benchmarks/README.md item 1). GPT-2 2.7B under 24 GiB
# with step_in_backward after the allocator fix (converting copies in 32 MiB pieces, pooled gradient buffers; not
# measured on 2.7B in the seventh session), DeepSpeed in the same call, then 64k tokens per step with the planner
# free to choose the micro-batches (it was fixed at 8 of 8) and plain PyTorch uncapped without recompute.
# Build times: the first job on a fresh machine imports inductor slowly (a 2.7B build took > 110 s): limits are wide.
source "$(dirname "$0")/lib.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl > "$OUT/logs/pip_ds.log" 2>&1
P="python3 benchmarks/offload_profile.py rannc --model 2.7b --no-profile --step-in-backward"
job sib 0 0-15 170 $P --steps 5 --warmup 2 --out $OUT/results/sib; wait
job ds3 0 0-15 170 env PYTHONPATH=$PYTHONPATH:/tmp/ds OUT=$OUT/results python3 benchmarks/offload_peers.py ds3; wait
job acc 0 0-15 130 $P --batch 64 --steps 2 --warmup 1 --out $OUT/results/acc; wait
job plain8 0 0-15 $((560 - SECONDS)) python3 benchmarks/offload_gpt.py --cases plain:8 --no-recompute --warmup 1 --steps 2 --out $OUT/results/plain8.json; wait
cat "$OUT/logs/summary.txt"; cat $OUT/results/*.jsonl; grep -h "tokens_per_s" $OUT/results/plain8.json
for f in $OUT/results/*/offload_profile_rannc.json; do python3 -c "
import json; r=json.load(open('$f')); e=r.get('engine_per_step',{})
print('$f'.split('/')[-2], 'step %.4f pred %.4f tok/s %.0f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['tokens_per_s'], r.get('max_allocated_gib',0)), r.get('blocks'), 'early %s cpu_step %.3f h2d %.1f d2h %.1f' % (e.get('early_block_steps'), e.get('step_time_s',0), e.get('h2d_bytes',0)/1e9, e.get('d2h_bytes',0)/1e9), [round(x,3) for x in r['step_times_s']])"; done
grep -h "^Plan\|^0 " $OUT/logs/acc.log
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
