"""The runtime axis: OpenVINO and ONNX Runtime (static int8) built from vitfab's ONNX graph, checked
against PyTorch fp32; the joint search's runtime pass; timing with each runtime's pool in a worker
of its own; runtimes that cannot run here left out with the reason."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from vitfab import tome
from vitfab.cli import main
from vitfab.errors import VitfabError
from vitfab.export import export_deploy
from vitfab.measure.speed import Timed, measure_speed
from vitfab.models import create_model, save_checkpoint
from vitfab.optimize.joint import JointCandidate
from vitfab.optimize.runtime_search import RuntimeAxis, resolve_runtimes, runtime_pass
from vitfab.runtimes import Deployed, OvModel, convert, load_deployed, runtime_precisions

pytest.importorskip("openvino")
CLASSES = ["a", "b", "c"]


def separable(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class shifts their mean: a task a tiny ViT learns in seconds."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    return torch.randn(n, 3, 32, 32, generator=g) + 0.8 * y.view(-1, 1, 1, 1).float(), y


@pytest.fixture(scope="module")
def trained():
    """A tiny ViT trained to 100 % on the separable task, ToMe macs=0.5 applied."""
    torch.manual_seed(0)
    m = create_model("deit_tiny_patch16_224", classes=CLASSES, img_size=32, patch_size=8)
    x, y = separable(192)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    for _ in range(25):
        for i in range(0, len(x), 32):
            loss = torch.nn.functional.cross_entropy(m(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    held, held_y = separable(96, seed=1)
    with torch.no_grad():
        assert (m(held).argmax(1) == held_y).float().mean() > 0.95  # trained: agreement below means something
    return tome.apply(m, "macs=0.5")


def test_openvino_ir_of_a_tome_model_matches_pytorch_fp32(tmp_path, trained):
    ir = convert(trained, "openvino", "fp32", tmp_path)
    ov = OvModel(ir, "fp32")
    x, _ = separable(5, seed=2)  # a batch size the export did not trace with
    with torch.no_grad():
        diff = (ov(x) - trained(x)).abs().max().item()
    assert diff <= 1e-4 and ov.vitfab_meta.classes == CLASSES
    assert ov.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"  # explicit, never bf16 by default
    with pytest.raises(VitfabError, match="not an int8 IR"):
        OvModel(ir, "int8")


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_static_int8_agrees_with_fp32_and_travels_in_the_deploy_folder(tmp_path, trained, runtime):
    trained.vitfab_meta.extra.update({"runtime": runtime, "precision": "int8"})
    calib = [separable(64, seed=3)[0].numpy()]
    held = separable(96, seed=1)[0]
    try:
        info = export_deploy("mem", tmp_path / "d", model=trained, calibration=calib, check=held.numpy())
    except VitfabError as exc:  # an int8 graph that disagrees is refused whole (ORT's QDQ on some CPUs: 90.6 %)
        assert "export check failed" in str(exc) and "< 99 %" in str(exc) and not (tmp_path / "d").exists()
        pytest.skip(f"{runtime} static int8 disagrees with fp32 on this CPU and was refused: {exc}")
    finally:
        trained.vitfab_meta.extra.pop("runtime"), trained.vitfab_meta.extra.pop("precision")
    low = info["low_precision_check"]
    assert low["argmax_agreement"] >= 0.99 and low["images"] == 96 and low["max_abs_diff"] > 0  # quantised
    assert info["int8"] == {"method": "static", "calibration_images": 64} and info["runtime"] == runtime
    assert max(info["parity_max_abs_diff"].values()) <= 1e-4 and info["parity_images"] == "held-back images"
    net = load_deployed(tmp_path / "d", runtime)  # recorded: the int8 graph
    assert net.vitfab_precision == "int8" and getattr(net, "int8_method", "static") == "static"
    with torch.no_grad():
        assert (net(held).argmax(1) == trained(held).argmax(1)).float().mean() >= 0.99


def test_int8_without_calibration_images_is_refused(tmp_path, trained):
    trained.vitfab_meta.extra.update({"runtime": "openvino", "precision": "int8"})
    try:
        with pytest.raises(VitfabError, match="calibration"):
            export_deploy("mem", tmp_path / "d", model=trained)
    finally:
        trained.vitfab_meta.extra.pop("runtime"), trained.vitfab_meta.extra.pop("precision")
    assert not (tmp_path / "d").exists()  # nothing half written


def test_a_runtime_that_cannot_run_here_is_left_out_with_its_reason(capsys):
    axis = resolve_runtimes(["torch", "openvino", "tensorrt"], torch.device("cpu"))
    assert axis.used == ["torch", "openvino"] and "NVIDIA" in axis.skipped["tensorrt"]
    assert "runtime tensorrt left out" in " ".join(capsys.readouterr().err.split())
    assert main(["export", "--model", "x", "--format", "tensorrt"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "tensorrt" in err and "Traceback" not in err


def _candidates(ckpt: str) -> list[JointCandidate]:
    return [JointCandidate("m", ckpt, t, p, "arch", 1, 0.01, [], accuracy=a, macro_f1=a, balanced_accuracy=a,
                           img_per_s=s, latency_ms=1.0)
            for t, p, a, s in ((None, "fp32", 0.9, 100.0), ("macs=0.5", "fp32", 0.9, 150.0),
                               (None, "int8", 0.5, 120.0))]


def test_runtime_pass_keeps_the_pytorch_candidates_and_scores_the_others_in_their_runtime(tmp_path, trained):
    from vitfab.evaluate.runner import CachedBatches
    from vitfab.runtimes import load_model

    save_checkpoint(tmp_path / "ck", tome.remove(trained))
    x, y = separable(48, seed=4)
    val = CachedBatches([(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)])
    torch_only = _candidates(str(tmp_path / "ck"))
    before = [c.to_dict() for c in torch_only]
    same = runtime_pass(torch_only, RuntimeAxis(["torch"], ["torch"]), 0.8, "throughput", "top1", val,
                        torch.device("cpu"), tmp_path / "w", [], load_model)
    assert [c.to_dict() for c in same] == before  # --runtimes torch: today's candidates, untouched
    axis = RuntimeAxis(["torch", "openvino"], ["torch", "openvino"])
    cands = runtime_pass(_candidates(str(tmp_path / "ck")), axis, 0.8, "throughput", "top1", val, torch.device("cpu"),
                         tmp_path / "w", [x[:32].numpy()], load_model, repeats=1, min_repeat_seconds=0.02,
                         latency_runs=2, progress=False)
    assert [c.key for c in cands[:3]] == [c["key"] for c in before]
    assert axis.screened == ["m / macs=0.5"]  # the front (fastest at 0.9) and the choice are that pair
    assert [c.screened_out for c in cands[:3]] == [True, False, True]
    ov = [c for c in cands if c.runtime == "openvino"]
    assert [c.precision for c in ov] == list(runtime_precisions("openvino", "cpu"))
    fp32 = next(c for c in ov if c.precision == "fp32")
    with torch.no_grad():
        want = (trained(x).argmax(1) == y).float().mean().item()  # trained carries macs=0.5
    assert fp32.accuracy == pytest.approx(want) and fp32.artifact.endswith("model.xml")
    assert all(c.img_per_s > 0 and c.error is None for c in cands if not c.screened_out)


def test_isolated_timing_runs_each_runtime_in_its_worker(tmp_path, trained):
    save_checkpoint(tmp_path / "ck", tome.remove(trained))
    ir = convert(trained, "openvino", "fp32", tmp_path / "w")
    specs = [Deployed("torch", "fp32", str(tmp_path / "ck"), "macs=0.5"), Deployed("openvino", "fp32", str(ir))]
    items = [Timed(None, (32, 32), 4, build=partial(d.build, "cpu"), pool=d.runtime) for d in specs]
    speeds = measure_speed(items, "cpu", repeats=2, min_repeat_seconds=0.02, latency_runs=3, isolate=True)
    assert all(s.img_per_s > 0 and len(s.latency_ms_runs) == 3 for s in speeds)
    bad = [Timed(None, (32, 32), 4, build=partial(Deployed("openvino", "fp32", str(tmp_path / "nothing.xml")).build,
                                                   "cpu"), pool="openvino")]
    with pytest.raises(VitfabError, match="timing worker could not build"):
        measure_speed(bad, "cpu", repeats=1, min_repeat_seconds=0.01, latency_runs=1, isolate=True)


def test_bench_and_predict_run_openvino(tmp_path, trained, capsys):
    from PIL import Image

    trained.vitfab_meta.extra["precision"] = "fp32"
    export_deploy("mem", tmp_path / "d", model=trained)
    code = main(["bench", "--checkpoint", str(tmp_path / "d"), "--tome-r", "recorded", "--vs", "runtime=openvino",
                 "--repeats", "1", "--min-repeat-seconds", "0.02", "--latency-runs", "2", "--no-energy", "--json",
                 "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    first, second = report["measurements"]
    assert "openvino" in second["label"] and "openvino" not in first["label"] and second["img_per_s"] > 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    for rt in ("torch", "openvino"):
        assert main(["predict", "--model", str(tmp_path / "d"), "--runtime", rt, "--input", str(imgs),
                     "--out", str(tmp_path / f"{rt}.csv"), "--device", "cpu"]) == 0
    read = [(tmp_path / f"{rt}.csv").read_text().splitlines() for rt in ("torch", "openvino")]
    assert [r.split(",")[:2] for r in read[0]] == [r.split(",")[:2] for r in read[1]]  # same files, same classes
