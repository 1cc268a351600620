"""``vitfab export``: a model as a ``deploy/`` folder that runs outside vitfab's training code.

deploy/
  model.safetensors + meta.json   the weights and what rebuilds them (a vitfab checkpoint folder:
                                  ``vitfab.load_model("deploy/")`` works)
  model.onnx                      ONNX (opset >= 17), dynamic batch, ToMe's matching and merges in
                                  the graph; the metadata JSON rides in the model's metadata_props
  model.ts                        TorchScript (traced), dynamic batch
  model.xml + model.bin           OpenVINO IR (fp32 weights, the metadata in its rt_info)
  model.int8.xml / .int8.onnx     where the model was chosen in int8 for OpenVINO / ONNX Runtime:
                                  the graph quantised statically on calibration images
  model.plan                      a TensorRT engine (``--format tensorrt``, where TensorRT is)
  deploy.json                     classes, preprocessing, architecture, ToMe schedule, runtime and
                                  precision chosen, how int8 was made (calibration images),
                                  operating point (temperature and reject threshold, where
                                  recorded), files, and the checks made at export: max |logit
                                  difference| of each fp32 format against PyTorch fp32, and the
                                  chosen low-precision artifact's argmax agreement with it, on
                                  held-back images (validation images of the run, where known;
                                  else a random batch of a size not used for tracing)

Token merging exports as ordinary tensor ops: the matching is a matmul, max, a descending
argsort and gathers; the size-weighted merge is a scatter-add of size x value then a division
(``scatter_reduce("mean")`` has no ONNX form). The token counts are fixed by the input size, so
the graph is static apart from the batch axis.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import VitfabError
from ..evaluate.api import labelled_samples
from ..evaluate.runner import image_batches
from ..files import atomic_dir, write_json_atomic, writing
from ..models.checkpoint import write_checkpoint
from ..options import option
from ..rundir import DEPLOY_FILE, ONNX_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, kind_of
from ..runtimes import (CALIBRATION_IMAGES, OPSET, STATIC_INT8, Deployed, artifact_name, convert, example_input,
                        load_model, load_torchscript, tensorrt_reason, to_onnx)
from ..tome import tome_info

FORMATS = ("safetensors", "torchscript", "onnx", "openvino", "tensorrt")
DEFAULT_FORMATS = ("safetensors", "torchscript", "onnx", "openvino")
FILES = {"safetensors": WEIGHTS_FILE, "torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE,
         "openvino": artifact_name("openvino", "fp32"), "tensorrt": artifact_name("tensorrt", "fp32")}
DEPLOY_FORMAT = "vitfab-deploy/2"
PARITY_TOLERANCE = 1e-4  # max |logit difference| against PyTorch fp32 that every fp32 artifact must meet
MIN_AGREEMENT = 0.99  # argmax agreement with PyTorch fp32 that every low-precision artifact must reach
TIE_SHARE, TIE_LIMIT = 0.02, 100  # a ToMe model's images allowed over the tolerance (near-ties in the matching)


@dataclass
class ExportConfig:
    """``vitfab export``: which model, where to, in which formats."""

    model: str | None = option(None, help="A vitfab checkpoint, run folder or main-job run (its chosen model).")
    out: str = option("deploy", help="The deploy folder to write (replaced atomically).")
    format: str = option(",".join(DEFAULT_FORMATS), help="Comma list of safetensors, torchscript, onnx, openvino "
                                                        "(IR), tensorrt (an engine; NVIDIA GPUs with TensorRT).")
    opset: int = option(OPSET, help="ONNX opset (>= 17).")
    tolerance: float = option(PARITY_TOLERANCE, help="Max |logit difference| against PyTorch fp32 each fp32 "
                                                     "artifact must meet.")
    calibration: str | None = option(None, help="Image folder that static int8 is calibrated on, where the model "
                                                "was chosen in int8 for OpenVINO or ONNX Runtime [default: the "
                                                "run's training split].")
    calibration_images: int = option(CALIBRATION_IMAGES, help="Images in the calibration set.")

    def run(self) -> dict[str, Any]:
        formats = parse_formats(self.format)
        if self.model is None:
            raise VitfabError("--model is required: a checkpoint, run folder or main-job run")
        if not Path(self.model).exists():
            raise VitfabError(f"not found: {self.model}")
        model = load_model(self.model, "cpu")
        calib, check = export_images(self.model, model, self.calibration, self.calibration_images)
        return export_deploy(self.model, self.out, formats, self.opset, self.tolerance, model, calib, check)


def parse_formats(value: str | Sequence[str]) -> list[str]:
    """The formats asked for; ONNX too where OpenVINO or TensorRT is (both are converted from it)."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise VitfabError(f"--format takes a comma list of {', '.join(FORMATS)}; got '{','.join(items) or value}'")
    if "tensorrt" in items:
        reason = tensorrt_reason()
        if reason:
            raise VitfabError(f"--format tensorrt: {reason}")
    if {"openvino", "tensorrt"} & set(items) and "onnx" not in items:
        items.insert(items.index(next(i for i in items if i in ("openvino", "tensorrt"))), "onnx")
    return list(dict.fromkeys(items))


CHECK_IMAGES = 64  # the held-back batch every artifact is checked on


def export_images(source: str | Path, model, calibration: str | Path | None,
                  count: int = CALIBRATION_IMAGES) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
    """(calibration batches, held-back check batch) for exporting ``model`` from ``source``:
    ``count`` images of ``calibration`` (a labelled folder) or of the run's training split, and
    validation images of the run; None for what is not known (the check then uses random inputs)."""
    calib_from = labelled_samples(model, None if calibration else str(source), calibration, False, "train")
    calib = None if calib_from is None else image_batches(calib_from[0], calib_from[1],
                                                          model.vitfab_meta.preprocess, count)
    held = labelled_samples(model, str(source), None, False, "val")
    check = None if held is None else np.concatenate(image_batches(held[0], held[1], model.vitfab_meta.preprocess,
                                                                   CHECK_IMAGES))
    return calib, check


def export_onnx(model, path: Path, opset: int = OPSET, metadata: dict[str, Any] | None = None) -> Path:
    """The fp32 model (ToMe included) as ONNX with a dynamic batch axis (``runtimes.to_onnx``)."""
    return to_onnx(model, path, opset, metadata or {})


def export_torchscript(model, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example_input(model, 2),), check_trace=False)
    with writing(path):
        traced.save(str(path))
    return path


def _artifact_logits(folder: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "torchscript":
        return load_torchscript(folder / FILES[fmt])(x).float()
    runtime = "onnxruntime" if fmt == "onnx" else fmt
    return Deployed(runtime, "fp32", str(folder / FILES[fmt])).build("cuda" if fmt == "tensorrt" else "cpu")(x).cpu()


@torch.inference_mode()
def parity(model, folder: Path, formats: Sequence[str], x: torch.Tensor | None = None
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each exported fp32 format against PyTorch fp32 on ``x`` (default: a random batch of a size the
    export did not trace with, so the dynamic batch axis is exercised): per image, the max |logit
    difference| and whether the class is the same."""
    x = example_input(model, 3, seed=1) if x is None else x
    ref = model(x).float()
    out = {}
    for f in formats:
        if f != "safetensors":
            got = _artifact_logits(folder, f, x)
            out[f] = ((got - ref).abs().amax(dim=1), got.argmax(1) == ref.argmax(1))
    return out


def parity_outliers(per_image: torch.Tensor, same_class: torch.Tensor, tolerance: float, merging: bool) -> int | None:
    """How many images exceed ``tolerance``, where that passes; None where it fails. No image may,
    except in a ToMe model: where two candidate pairs are nearly equally similar, the matching of
    another runtime's kernels may merge the other pair, which moves the logits of that image by
    more than rounding. At most ``TIE_SHARE`` of the images (at least one) may then differ, each
    within ``TIE_LIMIT`` x ``tolerance`` and with the same class."""
    over = per_image > tolerance
    n = int(over.sum())
    if n == 0:
        return 0
    allowed = max(1, int(TIE_SHARE * len(per_image)))
    ok = (merging and n <= allowed and bool((per_image[over] <= TIE_LIMIT * tolerance).all())
          and bool(same_class[over].all()))
    return n if ok else None


@torch.inference_mode()
def low_precision_check(model, deployed: Deployed, x: torch.Tensor) -> dict[str, float]:
    """A low-precision artifact against PyTorch fp32 on ``x``: argmax agreement and max |logit difference|."""
    ref = model(x).float()
    got = deployed.build("cuda" if deployed.runtime == "tensorrt" else "cpu")(x).float().cpu()
    return {"argmax_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            "max_abs_diff": float((got - ref).abs().max()), "images": int(len(x))}


def check_out(source: str | Path, out: str | Path) -> None:
    """``out`` is replaced as a whole: refuse a folder that is not an earlier deploy folder (a run
    folder, a home directory) and one that holds the source."""
    out = Path(out).resolve()
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and kind_of(out) != "deploy"):
            raise VitfabError(f"--out {out} exists and is not a deploy folder: it would be replaced; choose a new path")
    src = Path(source).resolve()
    if Path(source).exists() and (src == out or out in src.parents):
        raise VitfabError(f"--out {out} holds the model being exported; choose another path")


def _chosen_artifact(model, tmp: Path, formats: Sequence[str], calibration) -> tuple[Deployed | None, dict | None]:
    """The artifact of the runtime and low precision the model was chosen in (int8 IR, int8 QDQ
    graph, fp16 engine), where that is not one of the fp32 formats; and how its int8 was made."""
    runtime = model.vitfab_meta.extra.get("runtime", "torch")
    precision = model.vitfab_meta.extra.get("precision", "fp32")
    fmt = "onnx" if runtime == "onnxruntime" else runtime
    if runtime == "torch" or precision == "fp32" or fmt not in formats:
        return None, None
    if precision == "int8" and runtime in STATIC_INT8 and not calibration:
        raise VitfabError(f"the model was chosen in {runtime} int8, which is calibrated on images: give "
                          f"--calibration DIR (or export from the run folder)")
    path = convert(model, runtime, precision, tmp, calibration)
    int8 = None if precision != "int8" else {"method": "static", "calibration_images": int(sum(map(len, calibration)))}
    return Deployed(runtime, precision, str(path)), int8


def export_deploy(source: str | Path, out: str | Path, formats: Sequence[str] = DEFAULT_FORMATS, opset: int = OPSET,
                  tolerance: float = PARITY_TOLERANCE, model=None, calibration: Sequence[np.ndarray] | None = None,
                  check: np.ndarray | None = None) -> dict[str, Any]:
    """``source`` (a checkpoint or run folder; or ``model``, an fp32 vitfab model) -> ``out``.

    The folder appears complete or not at all. Fails (and writes nothing) where an fp32 format's
    logits differ from PyTorch's by more than ``tolerance`` on the check batch (``check``: held-back
    images; default random), or where the artifact of the low precision the model was chosen in
    (OpenVINO/ONNX Runtime int8 calibrated on ``calibration``, a TensorRT fp16 engine) agrees with
    PyTorch fp32's argmax on fewer than ``MIN_AGREEMENT`` of them. A ``model`` given is used as it
    is (put in fp32 and eval mode, in place).
    """
    formats = parse_formats(formats)
    check_out(source, out)
    if model is None:
        model = load_model(source, "cpu")
    model = model.float().eval()
    meta = model.vitfab_meta
    precision = meta.extra.get("precision", "fp32")
    runtime = meta.extra.get("runtime", "torch")
    x = None if check is None else torch.from_numpy(np.asarray(check, dtype=np.float32))
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        meta_dict = write_checkpoint(tmp, model, {"precision": precision, "runtime": runtime})  # safetensors + meta
        if "onnx" in formats:
            export_onnx(model, tmp / FILES["onnx"], opset, {"vitfab": json.dumps(meta_dict)})
        if "torchscript" in formats:
            export_torchscript(model, tmp / FILES["torchscript"])
        for fmt in ("openvino", "tensorrt"):
            if fmt in formats:
                convert(model, fmt, "fp32", tmp)
        checked = parity(model, tmp, formats, x)
        diffs = {f: float(d.max()) for f, (d, _) in checked.items()}
        merging = tome_info(model) is not None
        outliers = {f: parity_outliers(d, same, tolerance, merging) for f, (d, same) in checked.items()}
        bad = {f: diffs[f] for f, n in outliers.items() if n is None}
        if bad:
            raise VitfabError(f"export parity failed: max |logit difference| {bad} > {tolerance} against PyTorch fp32")
        chosen, int8 = _chosen_artifact(model, tmp, formats, calibration)
        low = None
        if chosen is not None:
            low = low_precision_check(model, chosen, example_input(model, 3, seed=1) if x is None else x)
            if low["argmax_agreement"] < MIN_AGREEMENT:
                raise VitfabError(f"export check failed: {chosen.runtime} {chosen.precision} agrees with PyTorch fp32's "
                                  f"class on {100 * low['argmax_agreement']:.1f} % of {low['images']} held-back images "
                                  f"(< {100 * MIN_AGREEMENT:.0f} %)")
        files = {f: FILES[f] for f in ["safetensors", *formats] if f in FILES}
        if chosen is not None:
            files[f"{chosen.runtime} {chosen.precision}"] = Path(chosen.artifact).name
        info = {
            "format": DEPLOY_FORMAT, "source": str(source), "classes": list(meta.classes),
            "preprocess": meta.preprocess.to_dict(), "model": {"name": meta.name, "kwargs": meta.kwargs},
            "tome": tome_info(model), "runtime": runtime, "precision": precision, "int8": int8,
            "operating_point": meta.extra.get("operating_point"),
            "opset": opset if "onnx" in formats else None, "files": files,
            "parity_max_abs_diff": diffs, "parity_tolerance": tolerance, "parity_outliers": outliers,
            "parity_images": "held-back images" if x is not None else "random inputs",
            "low_precision_check": low, "min_agreement": MIN_AGREEMENT if low else None, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(tmp / DEPLOY_FILE, info)
    return info
