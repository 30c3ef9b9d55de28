# Shared prelude of the H200 session scripts (sourced): paths, wheels, a job runner with a deadline
# (SIGUSR1 at the deadline: recipes and benchmarks print every thread's stack, then SIGKILL 20 s later).
#   source benchmarks/h200/lib.sh; job NAME GPU CORES TIMEOUT_S cmd...   (runs in the background)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs" "$OUT/results"
export PYTHONPATH=$PWD
T0=$SECONDS
if ls .whl/*.whl >/dev/null 2>&1; then   # datasets & co (not on the device image)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/logs/pip.log" 2>&1 && export PYTHONPATH=$PWD:/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=index,name,memory.total --format=csv; nvidia-smi topo -m; lscpu | grep -E "^(CPU\(s\)|NUMA|Model name|Socket)"; free -g; } \
  > "$OUT/logs/machine.txt" 2>&1

job() {  # NAME GPU CORES TIMEOUT_S cmd... ; stdout+stderr to $OUT/logs/NAME.log, rc and seconds appended
  local name=$1 gpu=$2 cores=$3 to=$4; shift 4
  ( local t=$SECONDS
    CUDA_VISIBLE_DEVICES=$gpu timeout -s USR1 -k 20 "$to" taskset -c "$cores" "$@" > "$OUT/logs/$name.log" 2>&1
    echo "[$name] rc=$? ${SECONDS}s-total $((SECONDS - t))s" | tee -a "$OUT/logs/$name.log" >> "$OUT/logs/summary.txt" ) &
}

ds_wheels() {  # DeepSpeed and its deps from .peer/whl into /tmp/ds (add /tmp/ds to PYTHONPATH for the peer job)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ds .peer/whl/*.whl \
    > "$OUT/logs/pip_ds.log" 2>&1
}
