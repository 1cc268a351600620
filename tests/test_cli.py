"""Every bad input: one line on stderr, exit code 2, no traceback, nothing written."""

import subprocess
import sys

import pytest

from vitfab.cli import main

TINY_ARGS = ["--model", "deit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
             "--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_data_folder(capsys, workdir):
    code, _, err = run_cli(capsys, "train", "--data", "nope", "--out", "run", "--no-progress")
    assert_one_line_error(code, err, "data folder not found: nope")
    assert not (workdir / "run").exists() and not (workdir / "runs").exists()


def test_one_class(capsys, workdir, make_folder):
    data = make_folder({"good": 4})
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", "run", "--no-progress")
    assert_one_line_error(code, err, "only one class")
    assert not (workdir / "run").exists()


def test_empty_class_folder(capsys, workdir, make_folder):
    data = make_folder({"good": 4, "void": 4})
    (data / "crack").mkdir()
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", "run", "--no-progress")
    assert_one_line_error(code, err, "has no images")
    assert not (workdir / "run").exists()


def test_truncated_image_then_skip(capsys, workdir, make_folder):
    data = make_folder({"good": 6, "void": 6}, size=32)
    good = (data / "good" / "good_0.png").read_bytes()
    (data / "void" / "cut.png").write_bytes(good[: len(good) // 2])
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", "run", "--no-progress")
    assert_one_line_error(code, err, "cut.png")
    assert "--skip-bad-images" in err and not (workdir / "run").exists()

    code, out, err = run_cli(capsys, "train", "--data", str(data), "--out", "run", "--no-progress",
                             "--skip-bad-images", "--epochs", "1", "--batch-size", "4", *TINY_ARGS)
    assert code == 0, err
    assert "skipped 1 unreadable image" in err and "cut.png" in err
    assert (workdir / "run" / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["train"], "--data DIR is required"),
        (["train", "--data", ".", "--model-arg", "depth"], "KEY=VALUE"),
        (["train", "--data", ".", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--data", ".", "--model", "deit_tinny"], "unknown timm model"),
        (["train", "--data", ".", "--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
        (["train", "--resume", "not-a-run"], "not a vitfab run folder"),
        (["eval"], "exactly one of"),
        (["eval", "--model", "deit_tiny_patch16_224", "--data", "."], "--pretrained or --weights"),
        (["eval", "--checkpoint", "missing.safetensors", "--data", "."], "checkpoint not found"),
        (["predict", "--checkpoint", "x", "--input", "missing.png"], "input not found"),
        (["data", "synth", "--out", "s", "--difficulty", "2"], "--difficulty must lie in [0, 1]"),
        (["data", "info", "missing"], "data folder not found"),
    ],
)
def test_argument_errors(capsys, workdir, argv, pattern):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, pattern)
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_pickled_code_refused_from_cli(capsys, workdir, make_folder):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (workdir / "evil.pth").write_bytes(pickle.dumps({"state_dict": Evil()}))
    data = make_folder({"good": 4, "void": 4})
    code, out, err = run_cli(capsys, "train", "--data", str(data), "--weights", "evil.pth", "--out", "run",
                             "--no-progress", *TINY_ARGS)
    assert_one_line_error(code, err, "refusing to load evil.pth")
    assert "pwned" not in out and not (workdir / "run").exists()


def test_console_script_usage_error_has_no_traceback(tmp_path):
    exe = [sys.executable, "-m", "vitfab"]
    r = subprocess.run(exe + ["train", "--data", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: data folder not found")
    assert "Traceback" not in r.stderr
    r = subprocess.run(exe + ["train", "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout


def test_data_info(capsys, make_folder):
    data = make_folder({"good": 5, "void": 2})
    code, out, _ = run_cli(capsys, "data", "info", str(data), "--no-progress", "--json")
    assert code == 0
    import json

    info = json.loads(out)
    assert info["classes"] == {"good": 5, "void": 2} and info["imbalance_ratio"] == 2.5


def test_cli_defaults_are_the_config_defaults():
    """Every option's default is the config field's: parse commands without options and compare
    the configs field by field (a default written in the CLI as well would differ here)."""
    import dataclasses

    from vitfab.cli import parse_configs
    from vitfab.measure.bench import BenchOptions, BenchRequest
    from vitfab.nas.train import SupernetConfig
    from vitfab.optimize import JobConfig
    from vitfab.train import TrainConfig

    for argv, want in ((["run"], {"config": JobConfig()}), (["train"], {"config": TrainConfig()}),
                       (["nas", "train"], {"config": SupernetConfig()}),
                       (["bench"], {"request": BenchRequest(), "options": BenchOptions()})):
        got = parse_configs(argv)
        assert set(got) == set(want), argv
        for key, config in want.items():
            for f in dataclasses.fields(config):
                assert getattr(got[key], f.name) == getattr(config, f.name), (argv, f.name)


def test_cli_options_reach_the_config():
    from vitfab.cli import parse_configs
    from vitfab.train import TrainConfig

    got = parse_configs(["train", "--data", "d", "--epochs", "3", "--model-arg", "depth=2", "--model-arg",
                         "embed_dim=64", "--no-augment", "--tome-r", "4", "--lr", "0.001"])["config"]
    assert got == TrainConfig(data="d", epochs=3, model_args={"depth": 2, "embed_dim": 64}, augment=False, tome="4",
                              lr=0.001)
