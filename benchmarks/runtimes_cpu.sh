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
OV_BF16=()  # OpenVINO runs bf16 only where the CPU has it natively
[ -n "$BF16" ] && OV_BF16=(--vs runtime=openvino,precision=bf16)
# run folders (their split.json gives the test split and the calibration images): the baseline's, and
# the training run that holds the chosen weights, with the chosen schedule
read -r CHOSEN_RUN CHOSEN_TOME < <(.venv/bin/python -c "
import json, sys, pathlib
s = json.load(open(sys.argv[1]))
f = s['stage_results']['final']
print(f['run'] if f['kept_tuned'] else pathlib.Path(f['subnet_checkpoint']).parent.parent, s['chosen']['tome'] or 'none')
" "$RUN/summary.json")
for who in ${WHO:-baseline chosen}; do
  if [ "$who" = baseline ]; then CK="$RUN/baseline"; T=none; else CK="$CHOSEN_RUN"; T="$CHOSEN_TOME"; fi
  "$VITFAB" bench --checkpoint "$CK" --tome-r "$T" --precision "fp32,int8$BF16" --split test \
      --vs runtime=onnxruntime,precision=fp32 --vs runtime=onnxruntime,precision=int8 \
      --vs runtime=openvino,precision=fp32 --vs runtime=openvino,precision=int8 "${OV_BF16[@]}" \
      --repeats 5 --device cpu --no-energy --no-progress --out "$RUN/report/runtimes-$who.json"
done
