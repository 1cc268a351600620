"""``vitfab bench`` and ``vitfab precision`` end to end (small models, short windows)."""

import json

import pytest

from vitfab.data.images import scan_image_folder
from vitfab.measure.bench import BenchConfig
from vitfab.models import create_model
from vitfab.models.checkpoint import save_checkpoint

from test_cli import assert_one_line_error, run_cli

FAST = ["--repeats", "2", "--min-repeat-seconds", "0.05", "--latency-runs", "3", "--energy-seconds", "0.2",
        "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_small):
    classes = scan_image_folder(synth_small).classes
    model = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                         classes=classes)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", model)


def test_bench_comparison_json(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", "--model", "deit_tiny_patch16_224", "--img-size", "32",
                                "--precision", "fp32,int8", "--batch-size", "4", "--vs", "precision=bf16,label=B",
                                "--device", "cpu", "--json", "--out", str(out), *FAST)
    assert code == 0, err
    report = json.loads(stdout)
    assert json.loads(out.read_text()) == report
    ms = report["measurements"]
    assert [m["precision"] for m in ms] == ["fp32", "int8", "bf16"]
    assert ms[2]["label"] == "B"
    assert len({m["macs"] for m in ms}) == 1 and len({m["params"] for m in ms}) == 1  # same network
    for m in ms:
        assert m["batch_size"] == 4 and m["img_size"] == 32 and len(m["img_per_s_runs"]) == 2
        assert m["img_per_s"] > 0 and m["latency_ms_p50"] <= m["latency_ms_p99"]
        assert (m["joules_per_img"] is None) == (m["energy_source"] == "unavailable")
        if m["joules_per_img"] is None:
            assert m["energy_note"]  # says why
    ratios = report["ratios_vs_first"]
    assert ratios[1]["speedup"] == pytest.approx(ms[1]["img_per_s"] / ms[0]["img_per_s"])


def test_bench_table_with_accuracy_and_auto(capsys, checkpoint, synth_small):
    code, stdout, err = run_cli(capsys, "bench", "--checkpoint", str(checkpoint), "--data", str(synth_small),
                                "--precision", "fp32,auto", "--device", "cpu", "--no-energy", *FAST)
    assert code == 0, err
    assert "top-1" in stdout and "ck fp32" in stdout and "ck auto->" in stdout and "switched off" in stdout


def test_precision_command(capsys, checkpoint, synth_small):
    code, stdout, err = run_cli(capsys, "precision", "--checkpoint", str(checkpoint), "--data",
                                str(synth_small), "--candidates", "fp32,bf16,int8", "--repeats", "1",
                                "--device", "cpu", "--json", "--no-progress")
    assert code == 0, err
    choice = json.loads(stdout)
    assert [t["precision"] for t in choice["trials"]] == ["fp32", "bf16", "int8"]
    chosen = next(t for t in choice["trials"] if t["precision"] == choice["precision"])
    assert chosen["accepted"] and "84 images" in choice["data"]


@pytest.mark.parametrize("argv,pattern", [
    (["bench"], "exactly one of --model NAME or --checkpoint PATH"),
    (["bench", "--model", "deit_tiny_patch16_224", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["bench", "--model", "deit_tiny_patch16_224", "--vs", "colour=red"], "--vs expects KEY=VALUE"),
    (["bench", "--model", "deit_tiny_patch16_224", "--vs", "batch_size=x"], "needs an integer"),
    (["bench", "--model", "deit_tiny_patch16_224", "--precision", "int8", "--device", "cuda"], "CUDA"),
    (["bench", "--model", "deit_tiny_patch16_224", "--precision", "auto"], "--precision auto checks accuracy"),
    (["bench", "--model", "no_such_model"], "no_such_model"),
    (["precision", "--checkpoint", "/nonexistent"], "not found"),
])
def test_bench_errors(capsys, argv, pattern):
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert_one_line_error(code, err, pattern)


def test_vs_overrides():
    base = BenchConfig(model="deit_base_patch16_224", img_size=64)
    other = base.with_overrides("checkpoint=runs/x, precision=int8")
    assert other.model is None and other.checkpoint == "runs/x" and other.img_size is None
    assert other.precision == "int8" and base.precision == "fp32"
    assert base.with_overrides("model=deit_tiny_patch16_224,tome_r=8").describe() == "deit_tiny fp32 r=8"


@pytest.mark.parametrize("argv,pattern", [
    (["bench", "--model", "deit_tiny_patch16_224", "--tome-r", "x"], "cannot read ToMe schedule 'x'"),
    (["bench", "--model", "deit_tiny_patch16_224", "--vs", "tome_r=keep=2"], "must be in (0, 1]"),
    (["train", "--data", "/tmp", "--tome-r", "-3"], "ToMe r must be >= 0"),
    (["tome", "visualize", "--checkpoint", "/nonexistent", "--image", "/nonexistent.png"], "image not found"),
])
def test_tome_option_errors(capsys, argv, pattern):
    code, _, err = run_cli(capsys, *argv, *(["--no-progress"] if argv[0] != "tome" else []))
    assert_one_line_error(code, err, pattern)
