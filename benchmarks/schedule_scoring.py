"""Issue 20's choice between the two ways to score a per-block ToMe schedule, by measurement.

For each fine-tuned subnet of a main-job run and each macs= target: a pool of schedules within
the target and the clip (the target's constant r, the greedy allocation and the searched one from
joint/schedules.json, and random walks of mutations from the constant r), each scored
  (a) by the supernet's validation top-1 and cross-entropy with that subnet set and ToMe inside its
      blocks (tome.apply_supernet: no subnet extracted, no fine-tuning);
  (b) by the probe's loss on the fine-tuned subnet (PROBE_IMAGES training images: the joint
      search's way);
against what decides in the end: the fine-tuned subnet's validation top-1 and cross-entropy with
that schedule (macro-F1 on validation and test beside them). Printed and written to RUN/report/schedule-scoring.json: Spearman correlation of
each score with the truth, the true top-1 of the schedule each way picks, seconds per score.

    .venv/bin/python benchmarks/schedule_scoring.py RUN_DIR [WALKS]
"""

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitfab import tome
from vitfab.data.split import Split
from vitfab.evaluate.accuracy import scores_of
from vitfab.evaluate.runner import CachedBatches, collect_logits, make_eval_loader
from vitfab.models.arch import ArchConfig
from vitfab.nas.train import load_supernet
from vitfab.optimize.schedule_search import probe_batches, schedule_loss
from vitfab.runtimes import load_model
from vitfab.tome.allocate import budget_macs, clipped, mutate_schedule
from vitfab.tome.patch import num_input_tokens


@torch.inference_mode()
def scores(model, batches) -> tuple[float, float, float]:
    """(top-1 %, mean cross-entropy, macro-F1 %) over ``batches``."""
    logits, targets = collect_logits(model, batches, torch.device("cpu"), progress=False)
    s = scores_of(logits, targets)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    return 100.0 * s["top1"], loss, 100.0 * s["macro_f1"]


def pool_of(record: dict, fixed: list[int], model, walks: int, seed: int) -> dict[str, list[int]]:
    """name -> r per block: constant, greedy, searched, and ``walks`` random walks within the target."""
    n_tok, prot, depth = num_input_tokens(model), model.num_prefix_tokens, len(model.blocks)

    def macs_of(flow):
        return tome.block_macs(model, flow)

    budget = budget_macs(depth, n_tok, prot, macs_of, tome.Schedule.parse(record["target"]).target)
    pool = {"constant": fixed, "greedy": clipped(record["greedy"], n_tok, prot),
            "searched": clipped(record["r_per_layer"], n_tok, prot)}
    rng, seen = random.Random(seed), {tuple(v) for v in pool.values()}
    for k in range(walks * 5):
        if len(pool) >= 3 + walks:
            break
        r = list(fixed)
        for _ in range(1 + k % 6):
            r = mutate_schedule(r, rng, n_tok, prot, macs_of, budget, step=rng.choice((1, 2, 4))) or r
        if tuple(r) not in seen:
            seen.add(tuple(r))
            pool[f"walk-{len(pool) - 2}"] = r
    return pool


def score_model(label, ckpt, arch, supernet, records, split, walks) -> list[dict]:
    model = tome.apply(load_model(ckpt).eval(), 0)
    pre = model.vitfab_meta.preprocess
    val, test = (CachedBatches(make_eval_loader(split.root, part, pre, batch_size=64, workers=0))
                 for part in (split.val, split.test))
    probe = probe_batches(split.root, split.train, pre)
    supernet.set_arch(arch)
    rows = []
    for rec in records:
        fixed = clipped(tome.resolve_schedule(model, rec["target"])[1], num_input_tokens(model),
                        model.num_prefix_tokens)
        for name, r in pool_of(rec, fixed, model, walks, seed=len(rows)).items():
            t0 = time.perf_counter()
            tome.apply_supernet(supernet, r)
            a_top1, a_loss, _ = scores(supernet, val)
            t1 = time.perf_counter()
            b_loss = schedule_loss(model, r, probe, torch.device("cpu"))
            t2 = time.perf_counter()
            tome.set_schedule(model, r)
            top1, loss, f1 = scores(model, val)
            test_top1, _, test_f1 = scores(model, test)
            rows.append({"model": label, "target": rec["target"], "name": name, "r": r, "supernet_top1": a_top1,
                         "supernet_loss": a_loss, "probe_loss": b_loss, "val_top1": top1, "val_loss": loss,
                         "val_macro_f1": f1, "test_top1": test_top1, "test_macro_f1": test_f1,
                         "seconds_a": t1 - t0, "seconds_b": t2 - t1})
            print(f"{label} {rec['target']:9s} {name:9s} {'/'.join(map(str, r)):40s} supernet {a_top1:5.1f}% "
                  f"{a_loss:.3f}  probe {b_loss:.3f}  fine-tuned {top1:5.1f}% {loss:.3f} (macro-F1 val {f1:.1f} / test "
                  f"{test_f1:.1f} %)", flush=True)
    return rows


def rho(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (tied values share their mean rank); None where either side is constant."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None

    def ranks(v):
        v = np.asarray(v, dtype=float)
        r = np.empty(len(v))
        r[v.argsort(kind="stable")] = np.arange(len(v))
        for u in np.unique(v):
            r[v == u] = r[v == u].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["model"], r["target"]) for r in rows}):
        g = [r for r in rows if (r["model"], r["target"]) == key]
        truth = [r["val_loss"] for r in g]
        pick_a = min(g, key=lambda r: (-r["supernet_top1"], r["supernet_loss"]))
        pick_b = min(g, key=lambda r: r["probe_loss"])
        out.append({"model": key[0], "target": key[1], "schedules": len(g),
                    "spearman_a_loss": rho([r["supernet_loss"] for r in g], truth),
                    "spearman_b_loss": rho([r["probe_loss"] for r in g], truth),
                    "spearman_a_top1": rho([r["supernet_top1"] for r in g], [r["val_top1"] for r in g]),
                    "picked_a": pick_a["name"], "picked_a_val_top1": pick_a["val_top1"],
                    "picked_b": pick_b["name"], "picked_b_val_top1": pick_b["val_top1"],
                    "constant_val_top1": next(r["val_top1"] for r in g if r["name"] == "constant"),
                    **{f"{n}_{m}": next(r[m] for r in g if r["name"] == n) for n in ("constant", "searched")
                       for m in ("val_macro_f1", "test_top1", "test_macro_f1")},
                    "best_val_top1": max(r["val_top1"] for r in g),
                    "seconds_a": float(np.median([r["seconds_a"] for r in g])),
                    "seconds_b": float(np.median([r["seconds_b"] for r in g]))})
    return out


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def main(run: Path, walks: int = 8) -> None:
    torch.set_grad_enabled(False)
    state = json.loads((run / "state.json").read_text())["stages"]
    split = Split.load(run / "split.json")
    supernet = load_supernet(state["supernet"]["result"]["run"])
    schedules = {p["model"]: p["schedules"] for p in json.loads((run / "joint" / "schedules.json").read_text())}
    rows = []
    for top, m in zip(state["search"]["result"]["top"], state["finetune"]["result"]["models"]):
        if m["label"] in schedules:
            rows += score_model(m["label"], m["checkpoint"], ArchConfig.from_dict(top["arch"]), supernet,
                                schedules[m["label"]], split, walks)
    summary = summarize(rows)
    for s in summary:
        print(f"{s['model']} {s['target']}: {s['schedules']} schedules; Spearman with the fine-tuned val loss: "
              f"(a) supernet {fmt(s['spearman_a_loss'])}, (b) probe {fmt(s['spearman_b_loss'])}; picked: (a) "
              f"{s['picked_a']} {s['picked_a_val_top1']:.2f}%, (b) {s['picked_b']} {s['picked_b_val_top1']:.2f}%, "
              f"constant {s['constant_val_top1']:.2f}%, best {s['best_val_top1']:.2f}%; s/score (a) "
              f"{s['seconds_a']:.2f} (b) {s['seconds_b']:.2f}; macro-F1 val / test: constant {s['constant_val_macro_f1']:.2f} / "
              f"{s['constant_test_macro_f1']:.2f}, searched {s['searched_val_macro_f1']:.2f} / "
              f"{s['searched_test_macro_f1']:.2f} %")
    (run / "report" / "schedule-scoring.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
