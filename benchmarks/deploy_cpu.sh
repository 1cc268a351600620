#!/usr/bin/env bash
# The chosen model of a `vitfab run` in PyTorch (fp32, its precision) and in ONNX Runtime (fp32,
# int8), one interleaved run (issue 8's closing note). Exports RUN/deploy first if it is missing.
# Usage: benchmarks/deploy_cpu.sh RUN_DIR [PRECISION]   (PRECISION: the chosen one, default from deploy.json)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: benchmarks/deploy_cpu.sh RUN_DIR [PRECISION]}
VITFAB=${VITFAB:-.venv/bin/vitfab}
PY=${PY:-.venv/bin/python}
[ -f "$RUN/deploy/deploy.json" ] || "$VITFAB" export --model "$RUN/chosen" --out "$RUN/deploy"
P=${2:-$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['precision'])" "$RUN/deploy/deploy.json")}
"$VITFAB" bench --checkpoint "$RUN/deploy" --tome-r recorded --precision "fp32,$P" \
    --vs runtime=onnxruntime,precision=fp32 --vs runtime=onnxruntime,precision=int8 \
    --device cpu --no-progress --out "$RUN/deploy/bench.json"
