import csv
import json

import pytest
import torch

from vitfab.cli import main
from vitfab.models import create_model
from vitfab.runtimes import load_model
from vitfab.train import TrainConfig, train

from conftest import TINY, write_image


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth_small):
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(data=str(synth_small), epochs=2, batch_size=16, amp="off", **TINY), out=out, progress=False)
    return out


def _cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return cap.out


def test_eval_run_reproduces_training_test_metrics(capsys, trained_run):
    out = _cli(capsys, "eval", "--run", str(trained_run), "--split", "test", "--json", "--no-progress")
    m = json.loads(out)
    during = json.loads((trained_run / "eval" / "test.json").read_text())
    assert m["confusion_matrix"] == during["confusion_matrix"]
    assert m["top1"] == pytest.approx(during["top1"])
    assert {"top1", "top5", "macro_f1", "per_class", "escape_rate", "overkill_rate"} <= m.keys()
    assert m["good_class"] == "good"
    assert (trained_run / "eval" / "confusion_test.png").stat().st_size > 0


def test_eval_checkpoint_on_folder_matches_manual_forward(capsys, trained_run, synth_small, tmp_path):
    out = _cli(capsys, "eval", "--checkpoint", str(trained_run / "checkpoints" / "best"), "--data",
               str(synth_small), "--out", str(tmp_path / "ev"), "--json", "--no-progress")
    m = json.loads(out)
    assert m["n"] == 7 * 12
    # recompute top-1 by hand with the model's own preprocessing
    from PIL import Image

    from vitfab.data.transforms import eval_transform

    model = load_model(trained_run)
    tf = eval_transform(model.vitfab_meta.preprocess)
    correct = 0
    for y, c in enumerate(model.vitfab_meta.classes):
        files = sorted((synth_small / c).glob("*.png"))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    assert m["top1"] == pytest.approx(correct / (7 * 12))
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "confusion.png").is_file()


def test_eval_imagenet_layout_maps_synsets(capsys, tmp_path):
    """The val layout has one folder per synset; labels must follow ImageNet's index, not the
    folder order. A rigged 1000-class model always predicts index 2 (n01484850), then 1."""
    model = create_model("deit_tiny_patch16_224", num_classes=1000, img_size=32, patch_size=8, depth=1,
                         embed_dim=32, num_heads=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-10.0)
        model.head.bias[2] = 10.0
        model.head.bias[1] = 5.0  # runner-up: n01443537 is in every top-5
    torch.save(model.state_dict(), tmp_path / "w.pth")
    val = tmp_path / "val"
    for syn in ("n01443537", "n01484850"):  # ImageNet indices 1 and 2; folder positions 0 and 1
        for i in range(3):
            write_image(val / syn / f"ILSVRC2012_val_{syn}_{i}.JPEG", size=40, value=60 * i)
    out = _cli(capsys, "eval", "--model", "deit_tiny_patch16_224", "--weights", str(tmp_path / "w.pth"),
               "--img-size", "32", "--patch-size", "8", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
               "--model-arg", "num_heads=2", "--data", str(val), "--out", str(tmp_path / "ev"), "--json",
               "--no-progress")
    m = json.loads(out)
    assert m["n"] == 6 and m["top1"] == pytest.approx(0.5) and m["top5"] == pytest.approx(1.0)
    assert m["per_class"]["n01484850"]["recall"] == 1.0
    assert m["per_class"]["n01443537"]["recall"] == 0.0
    assert "confusion_matrix" not in m  # 1000x1000 left out of the JSON


def test_predict_csv(capsys, trained_run, synth_small, tmp_path):
    inputs = [synth_small / "void", synth_small / "good" / "good_00000.png"]
    _cli(capsys, "predict", "--checkpoint", str(trained_run), "--input", str(inputs[0]), "--input",
         str(inputs[1]), "--out", str(tmp_path / "p.csv"), "--topk", "3", "--batch-size", "5", "--no-progress")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 13 and rows[-1]["file"].endswith("good_00000.png")
    model = load_model(trained_run)
    classes = model.vitfab_meta.classes
    from PIL import Image

    from vitfab.data.transforms import eval_transform

    tf = eval_transform(model.vitfab_meta.preprocess)
    for r in rows[:3]:
        top = [t.split(":") for t in r["topk"].split("|")]
        probs = [float(p) for _, p in top]
        assert len(top) == 3 and probs == sorted(probs, reverse=True)
        assert top[0][0] == r["class"] and float(r["confidence"]) == pytest.approx(probs[0])
        with torch.no_grad():
            p = model(tf(Image.open(r["file"]).convert("RGB"))[None]).softmax(-1)[0]
        assert classes[int(p.argmax())] == r["class"]
        assert float(r["confidence"]) == pytest.approx(float(p.max()), abs=1e-5)


def test_predict_bad_image(capsys, trained_run, synth_small, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    good = synth_small / "good" / "good_00001.png"
    code = main(["predict", "--checkpoint", str(trained_run), "--input", str(good), "--input", str(bad),
                 "--out", str(tmp_path / "p.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and not (tmp_path / "p.csv").exists()
    _cli(capsys, "predict", "--checkpoint", str(trained_run), "--input", str(good), "--input", str(bad),
         "--out", str(tmp_path / "p.csv"), "--skip-bad-images", "--no-progress")
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 1
