#!/bin/bash
# H200 x1, ~6 min, every job alone (fourteenth session; benchmarks/README.md item 4). next57 found compiled BERT-large
# running fp32 math attention: compiled, the model's own forward (the fast path) builds Hugging Face's all-true
# padding mask, which eager skips and capture drops. Compiled encoders now run the captured graph. Attention kernels
# with a padding mask in the forms it can take, eager and compiled; then BERT-large plain / eager / compiled (new
# path) / plain compiled at 32 x 512; then the compiled captured graph with a padded batch, profiled.
source "$(dirname "$0")/lib.sh"
job masks 0 0-15 120 python3 benchmarks/h200/sdpa_compile.py --masks; wait
job single 0 0-15 330 env RANNC_HF_RESULTS=$OUT/results python3 benchmarks/single_gpu.py --variants plain:bert-large:32 rannc:bert-large:32 rannc-compile:bert-large:32 plain-compile:bert-large:32 --steps 8 --warmup 3; wait
job padded 0 0-15 $((540 - SECONDS)) python3 benchmarks/offload_profile.py rannc --model bert-large --batch 32 --offload none --cap 100GiB --compile true --padded --steps 4 --warmup 3 --out $OUT/results/padded; wait
cat "$OUT/logs/summary.txt"; grep -v Warn $OUT/logs/masks.log | cut -c1-260
grep -v Warn $OUT/logs/single.log | grep -i "tokens/s\|error\|Traceback\|ratio\|declined" | tail -12
for f in $OUT/results/*/offload_profile_rannc*.json; do python3 -c "
import json; r=json.load(open('$f'))
print('$f'.split('/')[-2], 'step %.4f pred %.4f enq %.4f peak %.2f' % (r['step_time_s'], r['predicted_step_time_s'], r['host_enqueue_s'], r.get('max_allocated_gib',0)), [round(x,3) for x in r['step_times_s']])"; done
python3 - <<'PY'
import gzip, json, collections, re, glob, os
for f in glob.glob(os.environ["OUT"] + "/results/padded/trace_*.json.gz"):
    t = json.load(gzip.open(f)); by = collections.Counter()
    for e in t["traceEvents"]:
        if e.get("cat") == "kernel" and re.search("flash|fmha|cudnn|sdpa|xmma_gemm_f32|softmax", e["name"], re.I): by[e["name"][:80]] += e["dur"]
    print(f, [(n, round(d / 1e3, 2)) for n, d in by.most_common(6)])
PY
cd "$OUT" && tar czf /tmp/bundle.tgz logs results && rm -rf logs results && mv /tmp/bundle.tgz .
