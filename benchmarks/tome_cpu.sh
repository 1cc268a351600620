#!/usr/bin/env bash
# ToMe on this CPU, one interleaved run (issue 4's closing note): stock timm DeiT-S and DeiT-B,
# patched at r=0, r=8, r=16 and the decreasing (16, -1) schedule, fp32 and bf16, batch 16, 224 px.
# Then the off-the-shelf accuracy per r of a trained small model (run folder $1, optional).
# Usage: benchmarks/tome_cpu.sh [RUN_DIR] ; results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
VITFAB=${VITFAB:-.venv/bin/vitfab}
mkdir -p benchmarks/results
vs=()
for p in fp32 bf16; do
    for r in none 0 8 16 16:-1; do
        vs+=(--vs "model=deit_base_patch16_224,precision=$p,tome_r=$r")
    done
done
"$VITFAB" bench --model deit_small_patch16_224 --precision fp32,bf16 --tome-r none,0,8,16,16:-1 "${vs[@]}" \
    --batch-size 16 --latency-runs 20 --device cpu --out benchmarks/results/tome_cpu.json
if [ $# -ge 1 ]; then
    "$VITFAB" bench --checkpoint "$1" --tome-r none,0,1,2,3,4,2:-1,4:-1 --split test --device cpu \
        --out benchmarks/results/tome_cpu_trained.json
fi
