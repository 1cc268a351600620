#!/usr/bin/env bash
# The bit-width comparison on this machine's CPU, one interleaved run (issue 3's closing note):
# DeiT-B/16 fp32 vs bf16 vs int8 (+ bf16 via autocast) vs DeiT-T/16 bf16 at 224 px, then the
# accuracy change of each mode on a trained small model (a run folder: $1, optional).
# Usage: benchmarks/bit_width_cpu.sh [RUN_DIR] ; results land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
VITFAB=${VITFAB:-.venv/bin/vitfab}
mkdir -p benchmarks/results
"$VITFAB" bench --model deit_base_patch16_224 --precision fp32,bf16,int8 \
    --vs precision=bf16,method=autocast --vs model=deit_tiny_patch16_224,precision=bf16 \
    --device cpu --out benchmarks/results/bit_width_cpu.json
if [ $# -ge 1 ]; then
    "$VITFAB" bench --checkpoint "$1" --precision fp32,fp16,bf16,int8 --device cpu \
        --out benchmarks/results/bit_width_cpu_trained.json
fi
