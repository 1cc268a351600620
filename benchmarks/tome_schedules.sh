#!/usr/bin/env bash
# Issue 20's comparison: each fine-tuned subnet of a main-job run with every macs= target's constant
# r beside the schedule searched for that target (joint/schedules.json), at fp32 and at the run's
# chosen precision, on the run's validation and test splits (top-1), one interleaved bench per split.
# Usage: benchmarks/tome_schedules.sh RUN_DIR   (writes RUN_DIR/report/tome-schedules-{val,test}.json)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: benchmarks/tome_schedules.sh RUN_DIR}
VITFAB=${VITFAB:-.venv/bin/vitfab}
PY=${PY:-.venv/bin/python}
# one line per model: LABEL SPECS (comma list: each target, then its searched schedule)
"$PY" - "$RUN" > "$RUN/report/tome-schedules.args" <<'PYEOF'
import json, sys
run = sys.argv[1]
for p in json.load(open(f"{run}/joint/schedules.json")):
    specs = []
    for s in p["schedules"]:
        specs += [s["target"]] + ([] if s["is_fixed"] else ["/".join(map(str, s["r_per_layer"]))])
    print(p["model"], ",".join(specs))
PYEOF
PREC=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen']['precision'])" "$RUN/summary.json")
while read -r label specs; do
  for split in val test; do
    "$VITFAB" bench --checkpoint "$RUN/finetune/$label" --tome-r "$specs" \
        --precision "$(echo "fp32,$PREC" | tr ',' '\n' | sort -u | paste -sd,)" --split "$split" \
        --repeats 5 --device cpu --no-energy --no-progress --out "$RUN/report/tome-schedules-$label-$split.json"
  done
done < "$RUN/report/tome-schedules.args"
