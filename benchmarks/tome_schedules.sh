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
# the Done-when pairs: every fixed target beside every searched schedule within 5 % of its img/s
# (same model, same precision), and the fastest fixed target beside the fastest searched schedule at
# least as accurate on validation
"$PY" - "$RUN" <<'PYEOF' | tee "$RUN/report/tome-schedules.md"
import glob, json, sys
run = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{run}/report/tome-schedules-*-val.json")):
    label = path.rsplit("/", 1)[1][len("tome-schedules-"):-len("-val.json")]
    val, test = (json.load(open(path.replace("-val.json", f"-{s}.json")))["measurements"] for s in ("val", "test"))
    for v, t in zip(val, test):
        spec = v["tome"]["spec"] if v["tome"] else "none"
        rows.setdefault((label, v["precision"]), []).append(
            {"spec": spec, "fixed": spec.startswith("macs="), "ips": v["img_per_s"], "ips_test": t["img_per_s"],
             "val": 100 * v["accuracy"], "test": 100 * t["accuracy"]})
print("| model | precision | fixed target | img/s | val / test top-1 | searched schedule | img/s | val / test top-1 |")
print("|---|---|---|---|---|---|---|---|")
for (label, prec), rs in rows.items():
    for f in (r for r in rs if r["fixed"]):
        for s in (r for r in rs if not r["fixed"]):
            if abs(s["ips"] / f["ips"] - 1) <= 0.05:
                print(f"| {label} | {prec} | {f['spec']} | {f['ips']:.0f} | {f['val']:.2f} / {f['test']:.2f} | "
                      f"{s['spec']} | {s['ips']:.0f} | {s['val']:.2f} / {s['test']:.2f} |")
print("\nAt equal accuracy: the fastest fixed target beside the fastest searched schedule at least as accurate on val")
for (label, prec), rs in rows.items():
    f = max((r for r in rs if r["fixed"]), key=lambda r: r["ips"])
    ok = [s for s in rs if not s["fixed"] and s["val"] >= f["val"]]
    line = f"- {label} {prec}: {f['spec']} {f['ips']:.0f} img/s (val / test {f['val']:.2f} / {f['test']:.2f}); "
    if ok:
        s = max(ok, key=lambda r: r["ips"])
        line += f"{s['spec']} {s['ips']:.0f} img/s (val / test {s['val']:.2f} / {s['test']:.2f}), {s['ips'] / f['ips']:.2f}x"
    print(line if ok else line + "no searched schedule is as accurate on val")
PYEOF
