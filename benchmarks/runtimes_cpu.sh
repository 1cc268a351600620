#!/usr/bin/env bash
# Issue 19's table: DeiT-B/16 (the run's baseline) and the chosen model, each in every runtime and
# precision that runs on this CPU, on the run's test split (top-1), one bench each (each runtime
# timed in a worker process of its own, interleaved rounds, medians). int8 in OpenVINO / ONNX
# Runtime is calibrated on 100 images of the run's training split.
# Usage: benchmarks/runtimes_cpu.sh RUN_DIR      (writes RUN_DIR/report/runtimes-{baseline,chosen}.json)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: benchmarks/runtimes_cpu.sh RUN_DIR}
VITFAB=${VITFAB:-.venv/bin/vitfab}
BF16=$(.venv/bin/python -c "from vitfab.runtime import cpu_has_native_bf16 as b; print(',bf16' if b() else '')")
for who in baseline chosen; do
  if [ "$who" = baseline ]; then CK="$RUN/baseline/checkpoints/best"; T=none; else CK="$RUN/chosen"; T=recorded; fi
  "$VITFAB" bench --checkpoint "$CK" --tome-r "$T" --precision "fp32,int8$BF16" --split test \
      --vs runtime=onnxruntime,precision=fp32 --vs runtime=onnxruntime,precision=int8 \
      --vs runtime=openvino,precision=fp32 --vs runtime=openvino,precision=int8 \
      --repeats 5 --device cpu --no-energy --no-progress --out "$RUN/report/runtimes-$who.json"
done
