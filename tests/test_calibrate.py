"""The operating point on a saved model: predict's pass / flag decisions at the recorded threshold,
eval at it, and ``vitfab calibrate`` rewriting only the operating point of a checkpoint or deploy
folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitfab.cli import main
from vitfab.evaluate.operating import p_good
from vitfab.evaluate.runner import collect_logits, make_eval_loader
from vitfab.export import export_deploy
from vitfab.models import create_model, save_checkpoint
from vitfab.runtimes import ir_meta, load_model, onnx_meta, ort_session

CLASSES = ["crack", "good", "void"]


def model():
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224", classes=CLASSES, img_size=32, patch_size=8, depth=2,
                        embed_dim=64, num_heads=2).eval()


def operating_point(threshold: float, temperature: float = 2.0) -> dict:
    return {"good_classes": ["good"], "temperature": temperature, "threshold": threshold, "met": True,
            "escape_rate": 0.0, "overkill_rate": 0.0, "recall": {}, "fitted_on": "by hand", "n_defective": 1,
            "n_good": 1, "shortfall": None,
            "ceilings": {"max_escape": 0.02, "max_overkill": 0.1, "min_recall": {}}}


@pytest.fixture
def images(make_folder, tmp_path):
    from PIL import Image

    root = make_folder({c: 6 for c in CLASSES}, tmp_path / "line", size=32)
    rng = np.random.default_rng(0)
    for f in sorted(root.rglob("*.png")):  # varied images, so the model's outputs vary
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
    return root


def _logits(m, root):
    from vitfab.data.images import scan_image_folder

    index = scan_image_folder(root, classes=CLASSES)
    loader = make_eval_loader(root, index.samples, m.vitfab_meta.preprocess, 64, workers=0)
    return index, *collect_logits(m, loader, torch.device("cpu"), progress=False)


def test_predict_decides_at_the_recorded_threshold(images, tmp_path):
    net = model()
    index, logits, _ = _logits(net, images)
    pg = p_good(logits, 2.0, [1])
    threshold = float(np.median(pg))  # about half pass, half are flagged
    save_checkpoint(tmp_path / "ckpt", net, {"operating_point": operating_point(threshold)})
    assert main(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(images), "--out",
                 str(tmp_path / "p.csv"), "--no-progress", "--device", "cpu"]) == 0
    rows = {r["file"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert len(rows) == len(index.samples)
    for (rel, _), p, z in zip(index.samples, pg, logits):
        r = rows[str(images / rel)]
        assert float(r["p_good"]) == pytest.approx(p, abs=1e-5)
        assert r["decision"] == ("pass" if p >= threshold else "flag")
        # a flagged image is reported with its most likely defect class, a passed one as good
        assert r["class"] == ("good" if p >= threshold else CLASSES[[0, 2][int(np.argmax(z[[0, 2]]))]])
    assert {r["decision"] for r in rows.values()} == {"pass", "flag"}


def test_predict_without_an_operating_point_decides_at_the_argmax(images, tmp_path):
    net = model()
    _, logits, _ = _logits(net, images)
    save_checkpoint(tmp_path / "ckpt", net)
    assert main(["predict", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(images), "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert all(r["decision"] == ("pass" if r["class"] == "good" else "flag") for r in rows)


def test_calibrate_changes_only_the_operating_point(images, tmp_path, capsys):
    net = model()
    save_checkpoint(tmp_path / "ckpt", net, {"operating_point": operating_point(0.999), "precision": "fp32"})
    export_deploy(tmp_path / "ckpt", tmp_path / "deploy")
    before = {p.name: p.read_bytes() for p in (tmp_path / "deploy").iterdir()}
    old_meta = json.loads(before["meta.json"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    onnx_before = ort_session(tmp_path / "deploy" / "model.onnx").run(None, {"images": x})[0]
    code = main(["calibrate", "--model", str(tmp_path / "deploy"), "--data", str(images), "--max-escape", "40",
                 "--max-overkill", "100", "--no-progress", "--json"])
    assert code == 0, capsys.readouterr().err
    record = json.loads(capsys.readouterr().out)
    d = tmp_path / "deploy"
    new_meta = json.loads((d / "meta.json").read_text())
    op = new_meta.pop("operating_point")
    old_meta.pop("operating_point")
    assert new_meta == old_meta and op == record["operating_point"] and op["threshold"] != 0.999
    assert record["after"]["escape_rate"] <= 0.4 and record["before"]["threshold"] == 0.999
    assert json.loads((d / "deploy.json").read_text())["operating_point"] == op
    assert onnx_meta(d / "model.onnx").extra["operating_point"] == op
    assert ir_meta(d / "model.xml").extra["operating_point"] == op  # the OpenVINO IR rewritten too
    assert load_model(d).vitfab_meta.extra["operating_point"] == op
    old_w = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    new_w = load_file(str(d / "model.safetensors"))
    assert old_w.keys() == new_w.keys() and all(torch.equal(old_w[k], new_w[k]) for k in old_w)
    assert np.array_equal(ort_session(d / "model.onnx").run(None, {"images": x})[0], onnx_before)
    assert (d / "model.ts").read_bytes() == before["model.ts"]
    assert json.loads((d / "calibration.json").read_text())["after"] == record["after"]
    # eval reports the rates at the new operating point beside the argmax ones
    assert main(["eval", "--checkpoint", str(d), "--data", str(images), "--json", "--no-progress", "--out",
                 str(tmp_path / "ev")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["operating_point"]["threshold"] == op["threshold"]
    assert m["operating_point"]["escape_rate"] == pytest.approx(record["after"]["escape_rate"])
    assert "escape_rate" in m and "overkill_rate" in m  # at the argmax


@pytest.mark.parametrize("args, msg", [
    (["--max-escape", "101"], "[0, 100]"),
    (["--min-recall", "good=0.9"], "defect class"),
    (["--good-class", "flawless"], "flawless"),
])
def test_calibrate_bad_input_is_one_line_and_writes_nothing(images, tmp_path, capsys, args, msg):
    save_checkpoint(tmp_path / "ckpt", model())
    before = (tmp_path / "ckpt" / "meta.json").read_text()
    code = main(["calibrate", "--model", str(tmp_path / "ckpt"), "--data", str(images), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and msg in err and "\n" not in err
    assert (tmp_path / "ckpt" / "meta.json").read_text() == before
    assert main(["calibrate", "--model", str(tmp_path / "nowhere"), "--data", str(images)]) == 2
