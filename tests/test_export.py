"""Deployment: export with ToMe inside, ONNX Runtime / TorchScript parity, predict and bench on the
exported model, and the sweep over ToMe r x precision on an ImageNet-layout folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vitfab import tome
from vitfab.cli import main
from vitfab.errors import VitfabError
from vitfab.export import export_deploy
from vitfab.export.deploy import parity_outliers
from vitfab.runtimes import load_deployed, onnx_meta
from vitfab.runtimes import load_torchscript
from vitfab.models import create_model, save_checkpoint

CLASSES = ["bridge", "crack", "good", "void"]


def deit(**kw):
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224", classes=CLASSES, img_size=32, patch_size=8, **kw).eval()


def subnet(embed="patch"):
    from vitfab.data.transforms import Preprocess
    from vitfab.models.arch import ArchConfig, SearchSpace
    from vitfab.models.meta import ModelMeta
    from vitfab.models.supernet import Supernet
    from vitfab.nas.extract import extract_subnet

    torch.manual_seed(0)
    space = SearchSpace.load("tiny", 32, 8)
    rel = 14 if embed == "patch" else 0  # relative-position attention, as the released supernets
    net = Supernet(space, len(CLASSES), rel_pos=rel, embed=embed)
    net.vitfab_meta = ModelMeta("vitfab_supernet", {}, CLASSES, Preprocess(img_size=32, crop_pct=1.0))
    return extract_subnet(net, ArchConfig(192, 12, (3, 4) * 6, (3.5, 4.0) * 6)).eval()


MODELS = {"vitfab-built deit_small-like": lambda: deit(embed_dim=96, num_heads=2, depth=4),
          "DeiT-Tiny": deit, "extracted AutoFormer subnet": subnet,
          "conv-stem subnet": lambda: subnet("conv"), "shifted-patch subnet": lambda: subnet("spt")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("schedule", ["macs=0.5", "3:-1"])
def test_onnx_and_torchscript_parity_with_tome_inside(name, schedule, tmp_path):
    model = tome.apply(MODELS[name](), schedule)
    assert any(r > 0 for r in tome.tome_info(model)["r_per_layer"])
    info = export_deploy("in-memory", tmp_path / "deploy", model=model)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # neither batch of the export
    with torch.inference_mode():
        ref = model(x)
        stock = tome.remove(MODELS[name]())(x)
    assert (ref - stock).abs().max() > 1e-3  # merging changes the logits: parity below is with ToMe on
    ort = load_deployed(tmp_path / "deploy", "onnxruntime")
    assert (ort(x) - ref).abs().max() <= 1e-3
    ts = load_torchscript(tmp_path / "deploy" / "model.ts")
    assert (ts(x) - ref).abs().max() <= 1e-3
    assert max(info["parity_max_abs_diff"].values()) <= 1e-3
    assert info["tome"]["r_per_layer"] == tome.tome_info(model)["r_per_layer"]
    import onnx

    proto = onnx.load(str(tmp_path / "deploy" / "model.onnx"))
    assert proto.opset_import[0].version >= 17
    ops = {n.op_type for n in proto.graph.node}
    assert {"TopK", "GatherElements", "ScatterElements"} <= ops and "ScatterND" not in ops
    assert onnx_meta(tmp_path / "deploy" / "model.onnx").classes == CLASSES


def test_deploy_folder_is_a_checkpoint_and_records_everything(tmp_path):
    from vitfab.runtimes import load_model

    model = tome.apply(deit(), "macs=0.5")
    save_checkpoint(tmp_path / "ckpt", model, {"precision": "int8"})
    code = main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "deploy"), "--json"])
    assert code == 0
    d = json.loads((tmp_path / "deploy" / "deploy.json").read_text())
    assert d["precision"] == "int8" and d["classes"] == CLASSES and d["preprocess"]["img_size"] == 32
    assert d["tome"]["spec"] == "macs=0.5" and set(d["files"]) == {"safetensors", "torchscript", "onnx", "openvino"}
    assert d["runtime"] == "torch" and d["low_precision_check"] is None  # chosen in PyTorch: no runtime graph
    again = load_model(tmp_path / "deploy")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))
    assert load_deployed(tmp_path / "deploy", "torch", precision="recorded").vitfab_precision == "int8"


def test_export_errors_leave_nothing(tmp_path, capsys):
    code = main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d")])
    assert code == 2 and "not found" in capsys.readouterr().err and not (tmp_path / "d").exists()
    save_checkpoint(tmp_path / "ckpt", deit())
    code = main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "d"), "--format", "tflite"])
    assert code == 2 and "--format" in capsys.readouterr().err and not (tmp_path / "d").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    code = main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "run")])
    assert code == 2 and "not a deploy folder" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"  # never replaced
    code = main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path)])
    assert code == 2 and (tmp_path / "ckpt" / "model.safetensors").is_file()
    with pytest.raises(VitfabError, match="parity"):  # an impossible tolerance: the folder is not written
        export_deploy("x", tmp_path / "d2", ["onnx"], tolerance=-1.0, model=deit())
    assert not (tmp_path / "d2").exists()


def test_parity_rule_allows_a_near_tie_of_the_matching_only():
    # per image max |logit difference| on 64 images; ELPV's chosen ToMe model met one like the second
    tol, clean = 1e-4, torch.full((64,), 5e-7)
    same = torch.ones(64, dtype=torch.bool)
    tie = clean.clone()
    tie[7] = 1.2e-4
    assert parity_outliers(clean, same, tol, merging=False) == 0
    assert parity_outliers(tie, same, tol, merging=True) == 1  # one image, small, same class: a near-tie
    assert parity_outliers(tie, same, tol, merging=False) is None  # without merging there are no ties to meet
    flipped = same.clone()
    flipped[7] = False
    assert parity_outliers(tie, flipped, tol, merging=True) is None  # another class is never a tie
    far, two = tie.clone(), tie.clone()
    far[7], two[9] = 2e-2, 1.2e-4
    assert parity_outliers(far, same, tol, merging=True) is None  # beyond TIE_LIMIT x the tolerance
    assert parity_outliers(two, same, tol, merging=True) is None  # more than 2 % of 64 images


def test_predict_with_both_runtimes_agrees(tmp_path, make_folder):
    folder = make_folder({c: 3 for c in CLASSES}, tmp_path / "imgs", size=32)
    export_deploy("x", tmp_path / "deploy", model=tome.apply(deit(), 2))
    rows = {}
    for rt in ("torch", "onnxruntime"):
        assert main(["predict", "--model", str(tmp_path / "deploy"), "--input", str(folder), "--runtime", rt,
                     "--out", str(tmp_path / f"{rt}.csv"), "--no-progress", "--device", "cpu"]) == 0
        rows[rt] = list(csv.DictReader(open(tmp_path / f"{rt}.csv")))
    assert len(rows["torch"]) == 12
    for a, b in zip(rows["torch"], rows["onnxruntime"]):
        assert a["file"] == b["file"] and a["class"] == b["class"]
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)
    code = main(["predict", "--model", str(tmp_path / "deploy" / "model.onnx"), "--input", str(folder),
                 "--out", str(tmp_path / "x.csv"), "--no-progress"])
    assert code == 2  # an .onnx file needs --runtime onnxruntime: one line, no CSV
    assert not (tmp_path / "x.csv").exists()


def test_bench_compares_pytorch_and_onnxruntime_in_one_run(tmp_path):
    from vitfab.measure.bench import BenchConfig, BenchOptions, benchmark

    export_deploy("x", tmp_path / "deploy", model=tome.apply(deit(), "macs=0.5"))
    d = str(tmp_path / "deploy")
    cfgs = [BenchConfig(checkpoint=d, tome_r="recorded"), BenchConfig(checkpoint=d, precision="bf16",
                                                                       tome_r="recorded"),
            BenchConfig(checkpoint=d, runtime="onnxruntime"), BenchConfig(checkpoint=d + "/model.onnx",
                                                                          precision="int8")]
    ms = benchmark(cfgs, BenchOptions("cpu", repeats=2, min_repeat_seconds=0.05, latency_runs=3, energy=False),
                   progress=False)
    assert ["onnxruntime" in m.label for m in ms] == [False, False, True, True]
    assert len({m.macs for m in ms}) == 1 and len({m.params for m in ms}) == 1  # same graph, ToMe in all four
    assert all(m.tome and m.tome["spec"] == "macs=0.5" for m in ms)
    assert all(m.img_per_s > 0 for m in ms)
    with pytest.raises(VitfabError, match="fixed in its graph"):
        BenchConfig(checkpoint=d, runtime="onnxruntime", tome_r="4").validate()
    with pytest.raises(VitfabError, match="onnxruntime"):
        BenchConfig(checkpoint=d + "/model.onnx", runtime="torch").validate()


# --------------------------------------------------------------------------- the sweep
@pytest.fixture
def imagenet_like(tmp_path, make_folder):
    """Three synset folders of the ImageNet-1k val layout, 4 images each."""
    return make_folder({"n01440764": 4, "n01443537": 4, "n01484850": 4}, tmp_path / "val", size=32)


def test_sweep_on_an_imagenet_layout_folder_resumes(imagenet_like, tmp_path, capsys):
    m = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    args = ["sweep", "--model", "deit_tiny_patch16_224", "--weights", str(tmp_path / "w.pth"), "--img-size", "32",
            "--patch-size", "8", "--data", str(imagenet_like), "--tome-r", "0,2,4", "--precision", "fp32,BF16", "--out",
            str(tmp_path / "sw"), "--repeats", "1", "--min-repeat-seconds", "0.02", "--json", "--no-progress"]
    assert main(args[:-2] + ["--tome-r", "0", "--no-progress"]) == 0  # a first, smaller sweep ...
    capsys.readouterr()
    assert main(args) == 0  # ... is resumed: its configuration is not measured again
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tome_r"], r["precision"]) for r in rows] == [(r, p) for p in ("fp32", "bf16") for r in ("0", "2", "4")]
    lines = (tmp_path / "sw" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["key"] for x in lines}) == 6
    for r in rows:
        assert r["images"] == 12 and 0 <= r["top1"] <= 1 and r["img_per_s"] > 0
    g = {r["tome_r"]: r["gmacs"] for r in rows if r["precision"] == "fp32"}
    assert g["0"] > g["2"] > g["4"]
    assert (tmp_path / "sw" / "sweep.png").is_file() and (tmp_path / "sw" / "sweep.csv").is_file()
    # the accuracy of r=0 fp32 is the model's top-1 on the folder, computed independently
    from vitfab.evaluate.api import evaluate_folder

    net = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, weights=str(tmp_path / "w.pth")).eval()
    metrics, _ = evaluate_folder(net, imagenet_like, tmp_path / "ev", progress=False)
    assert np.isclose(metrics["top1"], next(r["top1"] for r in rows if r["key"] == "r=0 fp32"))


def test_sweep_refuses_other_settings_and_untrained_models(imagenet_like, tmp_path, capsys):
    code = main(["sweep", "--model", "deit_tiny_patch16_224", "--data", str(imagenet_like), "--no-progress"])
    assert code == 2 and "--pretrained or --weights" in capsys.readouterr().err
    code = main(["sweep", "--model", "deit_tiny_patch16_224", "--pretrained", "--data", str(tmp_path / "none"),
                 "--no-progress"])
    assert code == 2 and "not found" in capsys.readouterr().err
