#!/usr/bin/env bash
# The main job's two runs of issue 7's closing note: the default (synthetic set, 10-minute budget)
# and the NEU steel-defect set (30-minute budget). Each writes report/, summary.json; wall times
# go to OUT/walltimes.txt. Run alone: two torch processes on 2 cores slow each other.
# Usage: benchmarks/main_job.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/main_job.sh OUT_DIR}
VITFAB=${VITFAB:-.venv/bin/vitfab}
mkdir -p "$OUT"
t() { local s=$SECONDS; "$@"; echo "wall $((SECONDS - s)) s: $*" >> "$OUT/walltimes.txt"; }
t "$VITFAB" run --out "$OUT/default" --no-progress
t "$VITFAB" run --data ../shared/datasets/neu-surface-defects --budget-minutes 30 --out "$OUT/neu" --no-progress
