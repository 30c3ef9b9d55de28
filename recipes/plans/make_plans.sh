#!/usr/bin/env bash
# Regenerates the committed plans for the 13B and 100B recipe configs (meta device; any machine).
#   bash recipes/plans/make_plans.sh [MODEL ...]      (default: all four)
set -euo pipefail
cd "$(dirname "$0")/../.."
models=("$@"); [[ ${#models[@]} -eq 0 ]] && models=(gpt2-13b gpt2-100b bert-13b bert-100b)
for model in "${models[@]}"; do
  seq=2048; [[ $model == bert* ]] && seq=512
  timeout 600 rannc-hf plan recipes/configs/$model.json --gpus 8 --gpus-per-node 8 --gpu-memory 141GB --host-memory 2TiB \
    --device h200 --batch-size 256 --seq-len $seq -q --out recipes/plans/${model}_8xh200.json \
    --plot recipes/plans/${model}_8xh200.png > recipes/plans/${model}_8xh200.txt 2>&1 || true
  timeout 600 rannc-hf plan recipes/configs/$model.json --gpus 64 --gpus-per-node 8 --gpu-memory 80GB --host-memory 2TiB \
    --device h100 --batch-size 1024 --seq-len $seq -q --out recipes/plans/${model}_64x80gb.json \
    --plot recipes/plans/${model}_64x80gb.png > recipes/plans/${model}_64x80gb.txt 2>&1 || true
done
