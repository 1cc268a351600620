"""ToMe's overhead against its physical limit: speedup over the stock model divided by the MACs
ratio (ToMe cannot be faster than the work it removes). DeiT-S and DeiT-B at 224 px, batch 16, on
the CPU, fp32 and bf16; stock, r=8, r=16 and (16, -1); all configurations timed interleaved in
one run (vitfab.measure.measure_speed), random weights (speed does not depend on them).

    PYTHONPATH=src python benchmarks/tome_overhead.py OUT.json [--partition reference|patches]
"""

import argparse
import json

import torch

from vitfab import tome
from vitfab.measure import Timed, count_macs, measure_speed
from vitfab.models import create_model
from vitfab.precision import prepare_model

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
SCHEDULES = (None, 8, 16, (16, -1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--partition", default=None, help="tome.apply's partition (omit on versions without it)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    rows, items = [], []
    for name in MODELS:
        for precision in args.precisions.split(","):
            for r in SCHEDULES:
                m = create_model(name).eval()
                if r is not None:
                    tome.apply(m, r, **({"partition": args.partition} if args.partition else {}))
                macs = count_macs(m)
                items.append(Timed(prepare_model(m, precision, "cpu"), (224, 224), 16))
                rows.append({"model": name, "precision": precision, "r": str(r) if r is not None else "stock",
                             "gmacs": round(macs / 1e9, 3)})
    speeds = measure_speed(items, "cpu", args.repeats, args.seconds, latency_runs=0, progress=True)
    for row, s in zip(rows, speeds):
        row["img_per_s"] = round(s.img_per_s, 2)
    for row in rows:
        stock = next(x for x in rows if x["model"] == row["model"] and x["precision"] == row["precision"]
                     and x["r"] == "stock")
        row["speedup"] = round(row["img_per_s"] / stock["img_per_s"], 3)
        row["macs_ratio"] = round(stock["gmacs"] / row["gmacs"], 3)
        row["speedup_over_macs_ratio"] = round(row["speedup"] / row["macs_ratio"], 3)
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "partition": args.partition,
            "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"{'model':<24} {'prec':<5} {'r':<9} {'GMACs':>7} {'img/s':>8} {'speedup':>8} {'MACs x':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<24} {r['precision']:<5} {r['r']:<9} {r['gmacs']:7.3f} {r['img_per_s']:8.2f} "
              f"{r['speedup']:8.3f} {r['macs_ratio']:7.3f} {r['speedup_over_macs_ratio']:6.3f}")


if __name__ == "__main__":
    main()
