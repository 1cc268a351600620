import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitfab.data.synth import SynthConfig, synthesize
from vitfab.runtimes import load_model
from vitfab.train import TrainConfig, resume, train
from vitfab.train.loop import warmup_cosine

from conftest import TINY


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == pytest.approx(0.01)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_run_folder_contents_and_recipe_options(tmp_path, synth_small):
    cfg = TrainConfig(data=str(synth_small), epochs=2, batch_size=8, mixup=0.8, cutmix=1.0, accum_steps=2,
                      clip_grad=1.0, amp="off", **TINY)
    r = train(cfg, out=tmp_path / "run", progress=False)
    root = tmp_path / "run"
    config = json.loads((root / "config.json").read_text())
    assert config["status"] == "done" and config["train"]["mixup"] == 0.8
    split = json.loads((root / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 7 * 12
    rows = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r_["epoch"] for r_ in rows] == [0, 1]
    assert all(np.isfinite(r_["train_loss"]) and 0 <= r_["val_top1"] <= 1 for r_ in rows)
    for which in ("best", "last"):
        meta = json.loads((root / "checkpoints" / which / "meta.json").read_text())
        assert meta["classes"] == split["classes"] and meta["preprocess"]["img_size"] == 32
        assert meta["model"]["kwargs"]["depth"] == 2
    assert (root / "checkpoints" / "last" / "train_state.pt").is_file()
    assert (root / "eval" / "test.json").is_file() and (root / "eval" / "confusion_test.png").stat().st_size > 0
    # the test metrics are those of the best checkpoint, re-evaluated from disk
    assert r.test["n"] == len(split["test"]) and r.best_epoch in (0, 1)
    model = load_model(root)
    assert model.vitfab_meta.extra["epoch"] == r.best_epoch


def _learns(data, epochs, model_kwargs, tmp_path, **kw):
    cfg = TrainConfig(data=str(data), epochs=epochs, batch_size=32, seed=0, warmup_epochs=1, **model_kwargs, **kw)
    return train(cfg, out=tmp_path / "run", progress=False)


@pytest.mark.slow
def test_learns_on_neu_subset(tmp_path, neu):
    """A small ViT from scratch on 80 images/class of real steel-defect images."""
    r = _learns(neu, 12, dict(model="deit_tiny_patch16_224", img_size=48, patch_size=8,
                                 model_args={"depth": 4}), tmp_path, max_per_class=80)
    print(f"NEU subset: test top-1 {r.test['top1']:.3f}")  # chance is 1/6 = 16.7%
    assert r.test["top1"] >= 0.5, r.test["top1"]
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


@pytest.mark.slow
def test_learns_on_synthetic_xray(tmp_path):
    data = tmp_path / "synth"
    synthesize(data, SynthConfig(n_per_class=100, img_size=48, seed=0, difficulty=0.0))
    r = _learns(data, 12, dict(model="deit_tiny_patch16_224", img_size=48, patch_size=8,
                                  model_args={"depth": 4}), tmp_path)
    print(f"synthetic: test top-1 {r.test['top1']:.3f}")  # chance is 1/7 = 14.3%
    assert r.test["top1"] >= 0.4, r.test["top1"]


def _cli(*args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vitfab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(n_per_class=40, img_size=32, seed=2))
    args = ["train", "--data", str(data), "--model", "deit_tiny_patch16_224", "--img-size", "32",
            "--patch-size", "8", "--model-arg", "depth=2", "--epochs", "6", "--batch-size", "16",
            "--amp", "off", "--no-progress", "--seed", "3"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    out_ref, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out_ref

    victim = _cli(*args, "--out", str(tmp_path / "killed"))
    meta = tmp_path / "killed" / "checkpoints" / "last" / "meta.json"
    deadline = time.time() + 300
    while not meta.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # kill -9 right after the first checkpoint
    victim.communicate()
    cfg = json.loads((tmp_path / "killed" / "config.json").read_text())
    assert cfg["status"] == "running", "the run finished before it could be killed"
    done_before = len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done_before < 6

    res = _cli("train", "--resume", str(tmp_path / "killed"), "--no-progress")
    out_res, _ = res.communicate(timeout=600)
    assert res.returncode == 0, out_res
    assert "resuming" in out_res

    a = load_file(str(tmp_path / "ref" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    rows_a = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows_b] == list(range(6))
    assert [r["val_top1"] for r in rows_a] == [r["val_top1"] for r in rows_b]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, synth_small):
    cfg = TrainConfig(data=str(synth_small), epochs=1, batch_size=16, amp="off", **TINY)
    train(cfg, out=tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    r = resume(tmp_path / "run", progress=False)
    assert r.best_epoch == 0 and len(r.history) == 1
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").read_bytes() == before


def test_balanced_sampling_draws_classes_equally_in_expectation():
    from vitfab.train.sampling import ShareSampler, balanced_weights

    labels = [0] * 90 + [1] * 9 + [2] * 1
    sampler = ShareSampler(len(labels), 10, 0, 1, torch.Generator().manual_seed(0), True,
                           balanced_weights(labels, 3))
    drawn = torch.tensor([labels[i] for _ in range(200) for i in sampler])
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert len(list(sampler)) == 100 and torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)
    plain = ShareSampler(len(labels), 10, 0, 1, torch.Generator().manual_seed(0), True, count=50)
    order = list(plain)
    assert len(order) == 50 and len(set(order)) == 50  # a fraction of an epoch: no repeats


def test_an_images_augmentation_is_the_same_for_any_number_of_processes(make_folder):
    """ShareSampler keys each draw with a seed from its place in the epoch: two processes' shares,
    batch by batch, are one process's keys; the dataset draws the augmentation from that seed
    alone and leaves the caller's random state as it was."""
    import random

    from vitfab.data.dataset import ImageListDataset
    from vitfab.data.transforms import Preprocess, train_transform
    from vitfab.train.sampling import ShareSampler

    one = list(ShareSampler(24, 8, 0, 1, torch.Generator().manual_seed(3), True, sample_seed=5))
    two = [list(ShareSampler(24, 8, r, 2, torch.Generator().manual_seed(3), True, sample_seed=5)) for r in (0, 1)]
    assert [k for b in range(3) for r in (0, 1) for k in two[r][4 * b:4 * b + 4]] == one
    assert len({seed for _, seed in one}) == 24 and sorted(i for i, _ in one) == list(range(24))
    root = make_folder({"a": 2}, size=32)
    ds = ImageListDataset(root, [("a/a_0.png", 0), ("a/a_1.png", 0)], train_transform(Preprocess(img_size=32)))
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), random.getstate())
    x = ds[(0, 11)][0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.manual_seed(99)  # another global state: the same image, the same seed, the same augmentation
    assert torch.equal(ds[(0, 11)][0], x)
    assert not all(torch.equal(ds[(0, s)][0], x) for s in range(12, 20))  # other seeds, other draws


def test_imbalanced_data_selects_on_macro_f1_and_balances(tmp_path, make_folder):
    """8:1 classes: the run samples class-balanced and keeps the epoch with the best validation
    macro-F1 (ties: the better top-1), as its metrics record says; balanced data keeps top-1."""
    from vitfab.data.images import scan_image_folder
    from vitfab.data.split import make_split
    from vitfab.train.loop import resolved_policy

    data = make_folder({"good": 48, "defect": 6}, size=32)
    cfg = TrainConfig(data=str(data), epochs=4, batch_size=8, amp="off", seed=3, lr=3e-3, **TINY)
    r = train(cfg, out=tmp_path / "run", progress=False)
    assert (r.select_on, r.balance) == ("macro_f1", "sampler")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(rows, key=lambda x: (x["val_macro_f1"], x["val_top1"], -x["epoch"]))
    assert r.best_epoch == best["epoch"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["select_on"], config["balance"]) == ("macro_f1", "sampler")
    even = make_split(scan_image_folder(make_folder({"a": 6, "b": 5}, root=tmp_path / "even")))
    assert resolved_policy(TrainConfig(data="x"), even) == ("top1", "none")
    skewed = make_split(scan_image_folder(data))
    assert resolved_policy(TrainConfig(data="x", balance="weights", select_on="top1"), skewed) == ("top1", "weights")


def test_time_limit_stops_before_an_epoch_that_would_end_late(tmp_path, make_folder, monkeypatch):
    """The stop rule on a fake clock: each epoch takes 10 s; a 25 s limit allows two (a third would
    end at 30 s), and the cut is recorded."""
    from vitfab.train import loop

    data = make_folder({"a": 6, "b": 6}, size=32)
    clock = {"t": 0.0}
    real_epoch = loop.Trainer.train_one_epoch

    def ten_seconds(self, epoch, progress):
        clock["t"] += 10.0
        return real_epoch(self, epoch, progress)

    monkeypatch.setattr(loop.Trainer, "train_one_epoch", ten_seconds)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    for limit, want_epochs, want_stop in ((25.0, 2, 2), (30.0, 3, 3), (None, 4, None)):
        cfg = TrainConfig(data=str(data), epochs=4, batch_size=4, amp="off", time_limit=limit, **TINY)
        r = train(cfg, out=tmp_path / f"run-{limit}", progress=False)
        assert len(r.history) == want_epochs and r.stopped_after == want_stop
