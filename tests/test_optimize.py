"""The joint optimiser: the choice rule, the budget, the ablation rows, distillation, and the
main job end to end (tiny models, small images) with its report, resume and error paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitfab.cli import main
from vitfab.errors import VitfabError
from vitfab.models import create_model, save_checkpoint
from vitfab.optimize import PIPELINE, Budget, JobConfig, JointCandidate, Requirement, ablation_rows, choose, joint_front
from vitfab.optimize.budget import search_size

WEIGHTS = {s.name: s.weight for s in PIPELINE}
from vitfab.precision import Precision
from vitfab.runtimes import runtime_precisions


def cand(name, acc, ips, gmacs=1.0, error=None, lat=None):
    return JointCandidate(name, "ckpt", None, "fp32", gmacs=gmacs, accuracy=acc, img_per_s=ips, error=error,
                          latency_ms=lat)


# --------------------------------------------------------------------------- the choice
def test_choose_fastest_that_meets_the_threshold():
    cs = [cand("a", 0.90, 100), cand("b", 0.85, 400), cand("c", 0.80, 900), cand("d", 0.95, 50),
          cand("e", 0.99, 5000, error="non-finite logits")]
    chosen, met = choose(cs, 0.85, "throughput")
    assert (chosen.model, met) == ("b", True)
    chosen, met = choose(cs, 0.5, "throughput")
    assert chosen.model == "c"  # the erroring candidate never wins, however fast
    chosen, met = choose(cs, 0.97, "throughput")
    assert (chosen.model, met) == ("d", False)  # nobody meets it: the most accurate, flagged


def test_choose_latency_and_ties():
    cs = [cand("a", 0.9, 100, lat=5.0), cand("b", 0.9, 200, lat=8.0), cand("c", 0.9, 100, gmacs=0.5, lat=5.0)]
    assert choose(cs, 0.9, "latency")[0].model == "c"  # same latency and accuracy: fewer MACs
    assert choose(cs, 0.9, "throughput")[0].model == "b"


def test_joint_front_is_the_non_dominated_set():
    rng = np.random.default_rng(0)
    cs = [cand(str(i), float(a), float(s)) for i, (a, s) in enumerate(zip(rng.random(40), rng.random(40) * 100))]
    front = {c.model for c in joint_front(cs, "throughput")}
    for c in cs:
        dominated = any(o.accuracy >= c.accuracy and o.img_per_s >= c.img_per_s
                        and (o.accuracy > c.accuracy or o.img_per_s > c.img_per_s) for o in cs)
        assert (c.model in front) == (not dominated)


def test_choice_on_macro_f1_for_imbalanced_data():
    """On imbalanced data the requirement and the choice compare macro-F1, not top-1: the fastest
    candidate here has the best top-1 (it calls everything 'good') and the worst macro-F1."""
    cs = [JointCandidate("a", "c", None, "fp32", accuracy=0.95, macro_f1=0.40, img_per_s=900),
          JointCandidate("b", "c", None, "fp32", accuracy=0.90, macro_f1=0.85, img_per_s=400),
          JointCandidate("c", "c", None, "fp32", accuracy=0.85, macro_f1=0.80, img_per_s=600)]
    assert choose(cs, 0.8, "throughput", "top1")[0].model == "a"
    assert choose(cs, 0.8, "throughput", "macro_f1")[0].model == "c"
    assert {c.model for c in joint_front(cs, "throughput", "top1")} == {"a"}  # a dominates on top-1
    assert {c.model for c in joint_front(cs, "throughput", "macro_f1")} == {"a", "b", "c"}


def test_choice_rejects_a_faster_candidate_that_misses_a_ceiling():
    """The fastest candidate meets the accuracy but its operating point misses the overkill ceiling:
    the next fastest that meets both is chosen; where none meets the ceilings, it says so."""
    def op(met, overkill):
        return {"met": met, "overkill_rate": overkill, "escape_rate": 0.02,
                "shortfall": None if met else f"escape <= 2.00 % needs {100 * overkill:.2f} % overkill"}

    from vitfab.optimize.joint import shortfall

    cs = [JointCandidate("fast", "c", None, "int8", accuracy=0.92, img_per_s=900, operating=op(False, 0.25)),
          JointCandidate("mid", "c", None, "fp32", accuracy=0.91, img_per_s=500, operating=op(True, 0.08)),
          JointCandidate("slow", "c", None, "fp32", accuracy=0.95, img_per_s=100, operating=op(True, 0.05))]
    assert choose(cs, 0.9, "throughput") == (cs[1], True) and shortfall(cs, 0.9, "top1") is None
    assert choose(cs, 0.94, "throughput") == (cs[2], True)
    chosen, met = choose(cs, 0.99, "throughput")  # nobody is accurate enough: the most accurate meeting the ceilings
    assert (chosen.model, met) == ("slow", False)
    assert "miss the accuracy" in shortfall(cs, 0.99, "top1")
    none_meet = [cs[0], JointCandidate("b", "c", None, "fp32", accuracy=0.9, img_per_s=100, operating=op(False, 0.4))]
    assert choose(none_meet, 0.5, "throughput")[1] is False
    assert shortfall(none_meet, 0.5, "top1").startswith("no candidate meets the ceilings; the closest, fast")


def test_operating_points_need_good_and_defective_validation_images():
    from vitfab.data.split import Split
    from vitfab.evaluate.operating import Ceilings
    from vitfab.optimize.config import passable_classes

    only_defects = Split("r", ["bad", "good"], [], [("a", 0), ("b", 0)], [])
    assert passable_classes(only_defects, None, Ceilings()) == []  # warned: rates at the argmax only
    with pytest.raises(VitfabError, match="val-fraction"):
        passable_classes(only_defects, None, Ceilings(max_escape=0.02))
    both = Split("r", ["bad", "good"], [], [("a", 0), ("b", 1)], [])
    assert passable_classes(both, None, Ceilings(max_escape=0.02)) == ["good"]
    assert passable_classes(Split("r", ["x", "y"], [], [("a", 0)], []), None, Ceilings()) == []


def test_teacher_is_the_best_reference_on_validation():
    from vitfab.optimize.results import ReferenceModel
    from vitfab.optimize.training_stages import pick_teacher

    def ref(label, top1, f1):
        return ReferenceModel(label.lower(), label, f"runs/{label}", f"ck/{label}", 3, 10.0, None, top1, f1)

    refs = [ref("A", 0.90, 0.60), ref("B", 0.85, 0.80), ref("C", 0.90, 0.70)]
    assert (pick_teacher(refs, "top1").best, pick_teacher(refs, "top1").teacher) == ("A", "ck/A")  # first of equals
    assert pick_teacher(refs, "macro_f1").teacher == "ck/B"
    given = pick_teacher(refs, "top1", "my/teacher")
    assert given.teacher == "my/teacher" and given.best == "A" and "my/teacher" in given.teacher_label
    assert pick_teacher([], "top1").teacher is None


def test_pilot_distils_only_beyond_the_noise_of_the_validation_split():
    from vitfab.optimize.training_stages import pilot_choice

    # 210 validation images: one image (0.48 points) is noise; the margin is max(1 point, 2 images)
    assert pilot_choice({"none": 0.143, "soft": 0.148, "hard": 0.143}, 210) == ("none", 0.01)
    assert pilot_choice({"none": 0.600, "soft": 0.567, "hard": 0.604}, 270)[0] == "none"
    assert pilot_choice({"none": 0.192, "soft": 0.343, "hard": 0.294}, 394)[0] == "soft"
    assert pilot_choice({"none": 0.50, "soft": 0.60, "hard": 0.60}, 100) == ("soft", 0.02)  # equals: the first
    assert pilot_choice({"none": 0.50, "soft": 0.51, "hard": 0.515}, 100)[0] == "none"  # under 2 images


def test_requirement():
    assert Requirement(max_drop=1.0).threshold(0.9) == pytest.approx(0.89)
    assert Requirement(min_accuracy=0.8, max_drop=None).threshold(0.9) == 0.8
    with pytest.raises(VitfabError):
        Requirement(min_accuracy=1.5).validate()
    with pytest.raises(VitfabError):
        Requirement(max_drop=-1).validate()
    assert JobConfig(min_accuracy=85).resolved().min_accuracy == pytest.approx(0.85)  # percent accepted


def test_candidate_round_trip():
    c = JointCandidate("subnet-1", "x", "macs=0.5", "int8", "E192", 10, 0.5, [2, 2], accuracy=0.9, macro_f1=0.7,
                       img_per_s=100.0, latency_ms=1.0)
    assert JointCandidate.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# --------------------------------------------------------------------------- the budget
def test_budget_shares_and_cuts():
    b = Budget(1000.0, WEIGHTS)
    total = sum(WEIGHTS.values())
    w = WEIGHTS["supernet"]
    assert b.share("supernet") == pytest.approx(1000 * w / total)
    b.finish("data", 400.0)  # a stage that overran leaves less to the rest
    assert b.share("supernet") == pytest.approx(600 * w / (total - WEIGHTS["data"]))
    n = b.epochs("supernet", 16, epoch_seconds=10.0)
    assert n == int(b.share("supernet") // 10) and n < 16 and any("supernet" in c for c in b.cuts)
    assert b.fit("baseline", 5.0, 3, 20.0, fraction=True) == (1, 0.25)  # fewer steps than one epoch
    assert any(c.startswith("baseline: 0.25 of 1 epoch") for c in b.cuts)
    assert b.epochs("baseline", 16, epoch_seconds=1e6) == 1  # never below one epoch
    assert b.epochs("baseline", 3, epoch_seconds=0.01) == 3  # never above nominal
    assert Budget(None, WEIGHTS).epochs("baseline", 16, 1e9) == 16 and Budget(None, WEIGHTS).share("baseline") is None
    assert Budget.from_dict(b.to_dict(), WEIGHTS) == b


def test_search_size_fits_the_share():
    b = Budget(100.0, WEIGHTS)
    assert search_size(None, 1.0, 16, 6, b) == (16, 6)
    assert search_size(1000.0, 1.0, 16, 6, b) == (16, 6) and not b.cuts
    pop, gens = search_size(50.0, 1.0, 16, 6, b)
    assert pop * gens <= 51 and gens >= 3 and b.cuts
    assert search_size(1.0, 1.0, 16, 6, Budget(1.0, WEIGHTS))[0] >= 4


# --------------------------------------------------------------------------- ablation rows
MODES = [Precision.FP32, Precision.BF16, Precision.INT8]


@pytest.mark.parametrize("tome,prec,chosen", [
    ("macs=0.5", "int8", "NAS + ToMe + int8"), (None, "int8", "NAS + int8"), ("4", "fp32", "NAS + ToMe"),
    (None, "fp32", "NAS"),
])
def test_ablation_rows_cover_every_axis_combination(tome, prec, chosen):
    rows = ablation_rows("B", "S", "S-tome", tome, prec, MODES, torch.device("cpu"), "macs=0.5")
    axes = [r.axes for r in rows]
    for combo in [(), ("nas",), ("tome",), ("bits",), ("nas", "tome"), ("nas", "bits"), ("tome", "bits"),
                  ("nas", "tome", "bits")]:
        assert combo in axes
    assert [r.name for r in rows if r.chosen] == [chosen]
    bits = {r.precision for r in rows if "bits" in r.axes}
    assert {"bf16", "int8"} <= bits and "fp32" not in bits
    for r in rows:
        assert (r.checkpoint == "B") == ("nas" not in r.axes)
        assert (r.tome is not None) == ("tome" in r.axes)
        if "nas" in r.axes:  # ToMe rows on the subnet use the weights fine-tuned with merging
            assert r.checkpoint == ("S-tome" if "tome" in r.axes else "S")
    assert {r.tome for r in rows if r.tome} == {tome or "macs=0.5"}


# --------------------------------------------------------------------------- distillation
def test_distillation_losses(synth_small, tmp_path):
    from vitfab.models import create_model, save_checkpoint
    from vitfab.rundir import RunDir
    from vitfab.train import TrainConfig
    from vitfab.train.loop import Trainer, prepare_split

    tiny_dataset = synth_small
    split = prepare_split(TrainConfig(data=str(tiny_dataset)), progress=False)
    classes = split.classes
    teacher = create_model("deit_tiny_patch16_224", classes=classes, img_size=32, patch_size=8)
    save_checkpoint(tmp_path / "teacher", teacher)
    out = torch.randn(4, len(classes))
    y = torch.tensor([0, 1, 0, 1])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t = teacher.eval()(x)
    for mode, alpha, tau in (("soft", 0.3, 2.0), ("hard", 0.5, 1.0)):
        cfg = TrainConfig(data=str(tiny_dataset), teacher=str(tmp_path / "teacher"), distill=mode,
                          distill_alpha=alpha, distill_tau=tau, amp="off", device="cpu")
        tr = Trainer(RunDir.create(tmp_path / f"run-{mode}"), cfg, split, progress=False)
        tr.setup(create_model("deit_tiny_patch16_224", classes=classes, img_size=32, patch_size=8))
        ce = F.cross_entropy(out, y)
        got = tr.distill_loss(x, out, ce)
        if mode == "soft":
            p_t = F.softmax(t / tau, -1)
            kl = (p_t * (p_t.log() - F.log_softmax(out / tau, -1))).sum(-1).mean()
            want = (1 - alpha) * ce + alpha * tau ** 2 * kl
        else:
            want = 0.5 * ce + 0.5 * F.cross_entropy(out, t.argmax(-1))
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    from vitfab.train.loop import check_config

    with pytest.raises(VitfabError, match="64 px"):  # a teacher of another input size, refused before any folder
        check_config(TrainConfig(data=str(tiny_dataset), teacher=str(tmp_path / "teacher"), img_size=64))
    other = create_model("deit_tiny_patch16_224", classes=["a", "b", "c"], img_size=32, patch_size=8)
    save_checkpoint(tmp_path / "other", other)
    cfg = TrainConfig(data=str(tiny_dataset), teacher=str(tmp_path / "other"), amp="off", device="cpu")
    tr = Trainer(RunDir.create(tmp_path / "run-bad"), cfg, split, progress=False)
    with pytest.raises(VitfabError, match="teacher"):
        tr.setup(create_model("deit_tiny_patch16_224", classes=classes, img_size=32, patch_size=8))


# --------------------------------------------------------------------------- the main job
def tiny_job(**kw) -> JobConfig:
    base = dict(n_per_class=8, img_size=32, patch_size=8, baseline_model="deit_tiny_patch16_224", min_reduction=1.0,
                baseline_epochs=1, supernet_epochs=1, finetune_epochs=1, final_epochs=1, reference_epochs=1,
                pilot_epochs=1, references="resnet18", batch_size=16, budget_minutes=0, top_k=1,
                tome_grid="none,macs=0.5", measure_seconds=0.02, speed_at_224=False, device="cpu", runtimes="torch",
                tome_search=False)
    return JobConfig(**(base | kw))


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    from vitfab.optimize import run_job

    out = tmp_path_factory.mktemp("job") / "run"
    summary = run_job(tiny_job(references="resnet18,deit_tiny_patch16_224", max_escape=30, runtimes="auto",
                               tome_search=True), out=out, progress=False)
    return out, summary


SUMMARY_FIELDS = ("accuracy", "macro_f1", "escape_rate", "overkill_rate", "params", "gmacs", "img_per_s", "speedup",
                  "latency_ms_p50", "joules_per_img")


def test_main_job_writes_the_evidence(job_run):
    out, summary = job_run
    for f in ("report/report.md", "report/report.html", "report/pareto.png", "report/speedup.png",
              "report/tome_merges.png", "report/confusion_chosen.png", "summary.json", "chosen/model.safetensors",
              "joint/candidates.json", "search/best.yaml", "deploy/model.onnx", "deploy/model.ts",
              "deploy/deploy.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert (out / "report" / "tome_schedule.png").is_file() == bool(s["chosen"]["tome"])
    assert s["device"]["type"] == "cpu" and s["device"]["threads"] >= 1
    assert s["chosen"]["precision"] in ("fp32", "bf16", "int8") and "tome" in s["chosen"]
    assert len(s["ablation"]) >= 8 and s["ablation"][0]["speedup"] == 1.0
    for row in s["ablation"]:
        for k in SUMMARY_FIELDS:
            assert k in row, k
        assert row["accuracy"] is not None and row["img_per_s"] > 0
        if row["joules_per_img"] is None:
            assert row["energy_note"]  # null energy always comes with the reason
    assert sum(r["chosen"] for r in s["ablation"]) == 1
    chosen_row = next(r for r in s["ablation"] if r["chosen"])
    assert s["primary_speedup"] == chosen_row["speedup"]  # trained weights, trained size, vs DeiT-B/16 fp32
    from vitfab.report.summary import Summary

    loaded = Summary.load(out / "summary.json")
    assert loaded.to_dict() == s  # the report can be rendered from the file alone
    base, dep = loaded.baseline, loaded.baseline_deployed  # DeiT-B/16 at its best: no faster deployment of it as good
    assert dep.checkpoint == base.checkpoint and dep.tome is None
    assert all(dep.img_per_s >= r.img_per_s for r in loaded.ablation
               if r.checkpoint == base.checkpoint and r.tome is None and r.accuracy >= base.accuracy - 0.01)
    assert s["deployed_speedup"] <= s["primary_speedup"] + 1e-9
    assert max(s["deploy"]["parity_max_abs_diff"].values()) <= 1e-3  # the chosen model in ONNX Runtime
    models = s["stage_results"]["finetune"]["models"]
    assert [m["label"] for m in models] == ["subnet-1"]
    refs = s["stage_results"]["references"]
    assert [m["label"] for m in refs["models"]] == ["ResNet-18", "DeiT-Tiny"]
    best = max(refs["models"], key=lambda m: m["val_top1"])  # balanced data: top-1 decides
    assert refs["best"] == best["label"] and refs["teacher"] == best["checkpoint"]
    taught = s["stage_results"]["pilot"]["mode"] != "none"
    assert all((m["teacher"] == best["checkpoint"]) == taught for m in models)  # the pilot's choice everywhere
    pilot = s["stage_results"]["pilot"]
    assert set(pilot["embed_scores"]) == {"patch", "conv", "spt"} and s["embed"] == pilot["embed"]
    from vitfab.runtimes import load_model

    stem = type(load_model(out / "chosen").patch_embed).__name__  # the pilot's embedding, down to the chosen model
    assert stem == {"patch": "PatchEmbed", "conv": "ConvStemEmbed", "spt": "ShiftedPatchEmbed"}[s["embed"]]
    assert s["starts"]["supernet"] == "random weights" and s["starts"]["ResNet-18"] == "random weights"
    assert {r["name"] for r in s["ablation"] if r["kind"] == "reference"} >= {"ResNet-18 (reference)",
                                                                             "DeiT-Tiny (reference)"}
    assert s["joint"]["requirement_source"] == refs["best"] and set(s["joint"]["reference_val"]) == {"ResNet-18",
                                                                                                      "DeiT-Tiny"}
    cands = json.loads((out / "joint" / "candidates.json").read_text())
    in_torch = [c for c in cands if c["runtime"] == "torch"]
    probes = s["stage_results"]["joint"]["schedule_search"]  # the searched schedule of macs=0.5 (issue 20)
    assert [p["model"] for p in probes] == ["subnet-1"]
    assert [x["target"] for x in probes[0]["schedules"]] == ["macs=0.5"]
    searched = [x for x in probes[0]["schedules"] if not x["is_fixed"]]  # the constant r again is not repeated
    precisions = len(s["stage_results"]["joint"]["precisions"])
    assert len(in_torch) == (2 + len(searched)) * precisions  # 1 subnet x (2 schedules + the searched one)
    for x in searched:
        mine = [c for c in in_torch if c["tome_name"] == "searched macs=0.5"]
        assert len(mine) == precisions and all(c["r_per_layer"] == x["r_per_layer"] for c in mine)
        assert all(c["key"].startswith("subnet-1 / searched macs=0.5 / ") for c in mine)
    axis = s["stage_results"]["joint"]["runtimes"]
    assert axis["used"] == ["torch", "onnxruntime", "openvino"] and "tensorrt" in axis["skipped"]
    others = [c for c in cands if c["runtime"] != "torch"]  # the screened pairs in every other runtime and precision
    per_pair = sum(len(runtime_precisions(rt, "cpu")) for rt in axis["used"] if rt != "torch")  # OpenVINO bf16 where native
    assert len(others) == len(axis["screened"]) * per_pair and all(c["accuracy"] is not None for c in others)
    assert all(not c["screened_out"] for c in others) and (out / "deploy" / "model.xml").is_file()
    chosen_rt = s["stage_results"]["joint"]["chosen"]["runtime"]
    assert json.loads((out / "deploy" / "deploy.json").read_text())["runtime"] == chosen_rt
    assert {r["runtime"] for r in s["ablation"] if r["kind"] == "runtime"} >= {"onnxruntime", "openvino"}
    md = (out / "report" / "report.md").read_text()
    html = (out / "report" / "report.html").read_text()
    assert s["device"]["name"] in md and "<table>" in html and 'src="pareto.png"' in html
    assert f"Patch embedding of the supernet and its subnets: {s['embed']}" in md and "Starting weights:" in md
    for row in s["ablation"]:
        assert row["name"] in md and f"{100 * row['accuracy']:.2f}" in md


def test_operating_point_travels_with_the_chosen_model(job_run):
    """--max-escape 30: every candidate has an operating point fitted on validation; the chosen
    model's is recorded in chosen/, deploy.json and the ONNX metadata; the quality stage reports it
    on test with its bounds, against the baseline and the best reference."""
    from vitfab.evaluate.operating import clopper_pearson_upper
    from vitfab.runtimes import onnx_meta

    out, summary = job_run
    cands = json.loads((out / "joint" / "candidates.json").read_text())
    assert all(c["operating"]["ceilings"]["max_escape"] == 0.3 for c in cands if c["error"] is None)
    assert summary.joint.ceilings.startswith("escape <= 30 %")
    assert summary.joint.ceilings_met == next(c.operating for c in summary.joint.candidates if c.chosen)["met"]
    op = json.loads((out / "chosen" / "meta.json").read_text())["operating_point"]
    assert json.loads((out / "deploy" / "deploy.json").read_text())["operating_point"] == op
    assert onnx_meta(out / "deploy" / "model.onnx").extra["operating_point"] == op
    q = summary.quality
    assert [r.kind for r in q.rows] == ["chosen", "baseline", "reference"] and q.good_classes == ["good"]
    assert q.rows[0].operating == op
    t = summary.chosen.test.operating
    assert t == q.rows[0].test and t["escape_upper"] == pytest.approx(clopper_pearson_upper(t["escapes"],
                                                                                            t["n_defective"]))
    assert q.comparison["low"] <= q.comparison["difference"] <= q.comparison["high"]
    assert q.escape_claim["images_needed"] == 9  # 0 escapes in 9 bound the rate below 30 %
    md = (out / "report" / "report.md").read_text()
    assert "## Inspection requirement and confidence" in md and "paired bootstrap 95 % interval" in md
    for f in ("escape_overkill.png", "reliability.png"):
        assert (out / "report" / f).stat().st_size > 0


def test_chosen_checkpoint_reproduces_its_test_metrics(job_run):
    """The saved model (ToMe + precision recorded) gives the test metrics the job reported."""
    from vitfab.data.split import Split
    from vitfab.evaluate.metrics import classification_metrics
    from vitfab.evaluate.runner import collect_logits, make_eval_loader
    from vitfab.runtimes import load_model
    from vitfab.tome import tome_info

    out, summary = job_run
    meta = json.loads((out / "chosen" / "meta.json").read_text())
    assert meta["precision"] == summary.chosen.precision
    model = load_model(out / "chosen", "cpu", precision="recorded")
    if summary.chosen.tome:
        assert tome_info(model)["r_per_layer"] == summary.chosen.r_per_layer
    split = Split.load(out / "split.json")
    logits, targets = collect_logits(model, make_eval_loader(split.root, split.test, model.vitfab_meta.preprocess),
                                     torch.device("cpu"), progress=False)
    m = classification_metrics(logits, targets, split.classes)
    assert m["top1"] == pytest.approx(summary.chosen.test.top1)
    assert summary.chosen_row.params == summary.chosen.params


def test_predict_runs_the_chosen_model(job_run, tmp_path, capsys):
    out, summary = job_run
    code = main(["predict", "--checkpoint", str(out / "chosen"), "--input", str(out / "data" / "void"), "--out",
                 str(tmp_path / "p.csv"), "--no-progress", "--device", "cpu"])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 8 and all(r["class"] in summary.data.classes for r in rows)
    for rt, prec in (("onnxruntime", "fp32"), ("torch", "fp32")):  # the deploy folder, both runtimes, fp32
        assert main(["predict", "--model", str(out / "deploy"), "--runtime", rt, "--precision", prec, "--input",
                     str(out / "data" / "void"), "--out", str(tmp_path / f"{rt}.csv"), "--no-progress"]) == 0
    a, b = (list(csv.DictReader(open(tmp_path / f"{rt}.csv"))) for rt in ("onnxruntime", "torch"))
    assert [r["class"] for r in a] == [r["class"] for r in b]
    assert np.allclose([float(r["confidence"]) for r in a], [float(r["confidence"]) for r in b], atol=1e-4)


def test_main_job_resumes_after_an_interruption(job_run, tmp_path, monkeypatch):
    """Killed in the joint stage: the resumed job keeps the finished stages and completes."""
    import dataclasses

    from vitfab.optimize import job, resume_job, run_job

    calls = {"n": 0}
    real = next(s for s in PIPELINE if s.name == "joint").run

    def boom(ctx, **results):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(ctx, **results)

    monkeypatch.setattr(job, "PIPELINE", tuple(dataclasses.replace(s, run=boom) if s.name == "joint" else s
                                               for s in PIPELINE))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_job(), out=out, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"data", "references", "pilot", "baseline", "supernet", "search", "finetune"}
    best = (out / "baseline" / "checkpoints" / "best" / "model.safetensors").read_bytes()
    summary = resume_job(out, progress=False)
    assert calls["n"] == 2 and summary.chosen.checkpoint
    assert (out / "baseline" / "checkpoints" / "best" / "model.safetensors").read_bytes() == best  # not retrained
    state2 = json.loads((out / "state.json").read_text())
    for k in state["stages"]:
        assert state2["stages"][k] == state["stages"][k]
    assert json.loads((out / "config.json").read_text())["status"] == "done"


def test_main_job_resumes_a_training_stage(tmp_path, monkeypatch):
    """Killed inside the supernet training: the resumed job continues that run folder."""
    from vitfab.nas import train as nas_train
    from vitfab.optimize import resume_job, run_job

    real = nas_train.SupernetTrainer.save_epoch

    def save_then_die(self, record, improved, val):
        real(self, record, improved, val)
        if record["epoch"] == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(nas_train.SupernetTrainer, "save_epoch", save_then_die)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_job(supernet_epochs=2), out=out, progress=False)
    monkeypatch.setattr(nas_train.SupernetTrainer, "save_epoch", real)
    summary = resume_job(out, progress=False)
    epochs = [json.loads(line)["epoch"] for line in (out / "supernet" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1] and summary.requirement_met is not None


def test_main_job_fits_a_budget_and_says_what_it_cut(tmp_path):
    """A 3-second budget: every training stage is cut to one epoch from a probed speed, the search
    to its floor, and the report lists each cut."""
    from vitfab.optimize import run_job

    s = run_job(tiny_job(budget_minutes=0.05, baseline_epochs=3, supernet_epochs=3, finetune_epochs=2,
                         final_epochs=2, reference_epochs=2), out=tmp_path / "run", progress=False)
    plans = json.loads((tmp_path / "run" / "state.json").read_text())["plans"]
    assert plans["baseline"]["baseline_ips"] > 0
    assert [plans[k]["epochs"] for k in ("baseline", "supernet", "finetune", "final")] == [1, 1, 1, 1]
    assert plans["baseline"]["fraction"] < 1  # DeiT-B/16 (here DeiT-T) gets part of an epoch: fewer steps
    assert plans["search"]["population"] >= 4 and plans["search"]["generations"] <= 3
    cuts = s.budget.cuts
    for prefix in ("reference ResNet-18: 1 of 2 epochs", "baseline: 0.", "supernet: 1 of 3 epochs", "finetune: 1 of 2",
                   "final: 1 of 2", "search: population"):
        assert any(c.startswith(prefix) for c in cuts), prefix
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert all(f"- cut: {c}" in md for c in cuts)


@pytest.mark.parametrize("args,msg", [
    (["--objective", "fastest"], "--objective"),
    (["--min-accuracy", "150"], "--min-accuracy"),
    (["--scale", "huge"], "--scale"),
    (["--data", "/nonexistent/folder"], "not found"),
    (["--tome-grid", "none,abc"], "ToMe"),
    (["--precisions", "fp8"], "precision"),
    (["--distill", "maybe"], "--distill"),
    (["--space", "base"], "smallest subnet"),  # no base-space subnet is 10x below DeiT-B: said before training
    (["--good-class", "flawless"], "--good-class"),
    (["--references", "resnet18,no_such_net"], "--references"),  # found before any training
    (["--requirement-from", "vgg99"], "--requirement-from"),
    (["--teacher", "/nonexistent/teacher"], "--teacher"),
    (["--embed", "hexagons"], "--embed"),
    (["--supernet-init", "deit_smal_patch16_224"], "unknown timm model"),
    (["--supernet-init", "deit_small_patch16_224=/nonexistent.safetensors"], "not found"),
    (["--supernet-weights", "/nonexistent.pth"], "--supernet-weights"),
    (["--max-escape", "150"], "--max-escape"),
    (["--max-overkill", "-3"], "--max-overkill"),
    (["--min-recall", "scratch=0.9"], "no such class"),
    (["--min-recall", "good=0.9"], "defect class"),
    (["--metric", "accuracy"], "--metric"),
    (["--good-class", "good,flawless"], "flawless"),
])
def test_run_bad_input_is_one_line(args, msg, tmp_path, capsys):
    code = main(["run", "--out", str(tmp_path / "r"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and msg.lower() in err.lower() and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_escape_ceiling_without_a_good_class_is_one_line(make_folder, tmp_path, capsys):
    data = make_folder({"scratch": 10, "dent": 10})
    code = main(["run", "--data", str(data), "--out", str(tmp_path / "r"), "--no-progress", "--max-escape", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "need a good class" in err and "\n" not in err and not (tmp_path / "r").exists()


def test_job_with_a_conv_stem_supernet_selected_from_a_pretrained_vit(tmp_path):
    """--embed conv and --supernet-init FILE: the pilot is skipped for the embedding, the supernet
    starts by weight selection (its checkpoint says so), the chosen model has the conv stem, and its
    architecture is timed at 224 px / patch 16."""
    from vitfab.optimize import run_job
    from vitfab.runtimes import load_model

    torch.manual_seed(0)
    src = create_model("vitfab_subnet", classes=list("abcdefg"), img_size=32, patch_size=8, embed_dim=256, depth=12,
                       num_heads=4, mlp_ratio=4.0, embed="conv")
    ck = save_checkpoint(tmp_path / "pretrained", src)
    s = run_job(tiny_job(references="none", embed="conv", supernet_init=str(ck), tome_grid="none", speed_at_224=True),
                out=tmp_path / "run", progress=False)
    assert s.at_224 is not None and s.at_224.speedup > 0  # at patch 16 the stem gets its fourth stage
    assert s.embed == "conv" and s.embed_reason == "set by --embed conv"
    assert s.starts["supernet"] == f"weight selection (uniform) from {ck}"
    sup = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["supernet"]["result"]
    from vitfab.models.checkpoint import read_meta

    meta = read_meta(Path(sup["run"]) / "checkpoints" / "best" / "model.safetensors")
    assert meta.extra["init"].startswith(f"weight selection (uniform) from {ck}") and "identity, identity" in meta.extra["init"]
    assert type(load_model(tmp_path / "run" / "chosen").patch_embed).__name__ == "ConvStemEmbed"


def test_energy_objective_needs_a_counter(tmp_path, capsys, monkeypatch):
    """Without a readable counter the job stops at once; with one, the objective is accepted and
    the counter closed again."""
    from vitfab.measure.energy import EnergyUnavailable
    from vitfab.optimize import joint

    def unavailable(device):
        raise EnergyUnavailable("no RAPL counters: test")

    monkeypatch.setattr(joint, "open_energy_counter", unavailable)
    code = main(["run", "--objective", "energy", "--device", "cpu", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "energy counter" in err and "no RAPL counters: test" in err and not (tmp_path / "r").exists()
    closed = []

    class Counter:
        def close(self):
            closed.append(True)

    monkeypatch.setattr(joint, "open_energy_counter", lambda device: Counter())
    joint.check_objective("energy", torch.device("cpu"))
    assert closed == [True]


def test_markdown_to_html():
    from vitfab.report import markdown_to_html

    md = "# T\n\npara **b** `c`\n\n- one\n- two\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n![fig](x.png)\n"
    h = markdown_to_html(md, "t")
    assert "<h1>T</h1>" in h and "<strong>b</strong>" in h and "<code>c</code>" in h
    assert "<li>one</li>" in h and "<li>two</li>" in h and h.index("<ul>") < h.index("<li>one</li>")
    assert "<td>&lt;2&gt;</td>" in h and "<th>a</th>" in h and "---" not in h  # raw HTML in the text is escaped
    assert '<img src="x.png" alt="fig"' in h


def test_a_run_folder_of_another_state_format_says_so(tmp_path, capsys):
    """state.json carries its format; a folder from before the typed stages is refused in one line."""
    from dataclasses import asdict

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "main", "status": "running", "job": asdict(tiny_job())}))
    (run / "state.json").write_text(json.dumps({"stages": {"data": {"data": "x"}}, "plans": {}}))
    code = main(["run", "--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "another vitfab version" in err and "\n" not in err


def test_stage_results_round_trip_through_state_json(job_run):
    """Every stage's saved result reads back as its typed dataclass and writes back to the same JSON."""
    from vitfab.records import from_json, to_json

    out, _ = job_run
    state = json.loads((out / "state.json").read_text())
    assert state["format"] == "vitfab-job-state/4" and [s.name for s in PIPELINE] == list(state["stages"])
    for stage in PIPELINE:
        saved = state["stages"][stage.name]["result"]
        result = from_json(stage.result, saved)
        assert isinstance(result, stage.result) and to_json(result) == saved


def test_budget_replans_on_a_fake_clock(tmp_path, monkeypatch):
    """Stages on a fake clock: one that overruns leaves the later ones less, one that finishes
    early leaves them more, and what the stages are given never exceeds what is left."""
    from vitfab.optimize import context
    from vitfab.optimize.context import JobContext, Stage, run_stages
    from vitfab.rundir import RunDir

    clock = {"t": 0.0}
    monkeypatch.setattr(context.time, "perf_counter", lambda: clock["t"])
    given, used = {}, {"a": 2.0, "b": 0.5, "c": 1.0, "d": 1.0}  # a overruns 2x, b leaves half unused

    def stage(name):
        def run(ctx, **_):
            given[name] = ctx.budget.share(name)
            clock["t"] += used[name] * given[name]
            return name
        return Stage(name, 1.0, run, (), str)

    stages = tuple(stage(n) for n in "abcd")
    run = RunDir.create(tmp_path / "run")
    ctx = JobContext(run, tiny_job(budget_minutes=400 / 60), stages, progress=False)
    run_stages(ctx, stages)
    assert given["a"] == pytest.approx(100)  # a quarter of 400 s
    assert given["b"] == pytest.approx((400 - 200) / 3)  # a's overrun shrinks what follows
    left = 400 - 200 - given["b"] / 2
    assert given["c"] == pytest.approx(left / 2)  # b's unused half goes to c and d
    assert given["d"] == pytest.approx(left / 2)
    assert ctx.budget.spent == pytest.approx(400)  # everything spent, no more
