#!/usr/bin/env bash
# AutoFormer at small scale on the NEU steel-defect set (issue 5's closing note): supernet
# training, search under a parameter limit, the best subnet (supernet weights, then fine-tuned)
# vs the same architecture trained alone vs the DeiT-Tiny baseline, all at 64 px / patch 8.
# Usage: benchmarks/nas_neu.sh OUT_DIR [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/nas_neu.sh OUT_DIR [EPOCHS]}
EPOCHS=${2:-20}
VITFAB=${VITFAB:-.venv/bin/vitfab}
DATA=../shared/datasets/neu-surface-defects
COMMON=(--data "$DATA" --img-size 64 --patch-size 8 --no-progress)
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; echo "wall $((SECONDS - s)) s: $*" >> "$OUT/walltimes.txt"; }
t "$VITFAB" nas train "${COMMON[@]}" --space tiny --epochs "$EPOCHS" --out "$OUT/supernet"
t "$VITFAB" nas search --supernet "$OUT/supernet" --max-params 5.5 --population 20 --generations 6 \
    --parents 5 --mutations 8 --crossovers 8 --no-progress --json > "$OUT/search.json"
t "$VITFAB" nas extract --supernet "$OUT/supernet" --subnet "$OUT/supernet/search/best.yaml" --out "$OUT/subnet"
PYTHONPATH=src .venv/bin/python - "$OUT" <<'PY' > "$OUT/subnet_test.json"
import json, sys
from pathlib import Path
from vitfab.data.split import Split
from vitfab.evaluate.runner import evaluate_model
from vitfab.models import load_model
out = Path(sys.argv[1])
split = Split.load(out / "supernet" / "split.json")
m = evaluate_model(load_model(out / "subnet"), split.root, split.test, split.classes, "cpu", progress=False)
print(json.dumps({"top1": m["top1"], "macro_f1": m["macro_f1"]}))
PY
t "$VITFAB" train "${COMMON[@]}" --arch "$OUT/supernet/search/best.yaml" --weights "$OUT/subnet/model.safetensors" \
    --epochs 5 --lr 1e-4 --warmup-epochs 0.5 --out "$OUT/finetuned" --json > "$OUT/finetuned.json"
t "$VITFAB" train "${COMMON[@]}" --arch "$OUT/supernet/search/best.yaml" --epochs "$EPOCHS" --out "$OUT/alone" \
    --json > "$OUT/alone.json"
t "$VITFAB" train "${COMMON[@]}" --model deit_tiny_patch16_224 --epochs "$EPOCHS" --out "$OUT/baseline" \
    --json > "$OUT/baseline.json"
