#!/usr/bin/env bash
# GPU checks for a lent device machine (torch/timm preinstalled, no network): CUDA throughput
# and latency of DeiT-B fp32 / fp16 / fp16-autocast / bf16 vs DeiT-T fp16, NVML J/img.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_precision.sh
set -euo pipefail
export PYTHONPATH=src
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > "$OUT/gpu.csv" || true
python -m vitfab bench --model deit_base_patch16_224 --precision fp32,fp16,bf16 \
    --vs precision=fp16,method=autocast --vs model=deit_tiny_patch16_224,precision=fp16 \
    --device cuda --batch-size 256 --energy-seconds 5 --no-progress --out "$OUT/gpu_precision.json"
