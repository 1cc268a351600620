"""Deploy runtimes: each turns a saved model or an exported artifact into a callable with fp32
images in, fp32 logits out and ``vitfab_meta`` set -- PyTorch eager (``pytorch``), ONNX Runtime
(``ort``), OpenVINO (``openvino``) and TensorRT (``tensorrt``, NVIDIA GPUs where installed).

``convert`` writes what a runtime runs a precision from (ONNX, an IR, a quantised graph, an
engine) into a folder; a ``Deployed`` names one such thing (runtime, precision, artifact) and
``build`` turns it into the callable -- in this process, or in a timing worker of its own
(``measure.isolated``), since it is a small picklable value.

int8 is one ``Precision``; how a runtime makes it is the runtime's: PyTorch quantises the Linear
layers dynamically (activation ranges per batch, at run time), OpenVINO and ONNX Runtime use a graph
quantised statically on calibration images (NNCF; ORT's QDQ), ONNX Runtime falls back to dynamic
quantisation where no such graph was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import VitfabError
from ..files import read_json
from ..options import RECORDED
from ..precision import prepare_model, useful_precisions
from ..rundir import DEPLOY_FILE, INT8_SUFFIX, ONNX_FILE, OPENVINO_FILE, TENSORRT_FILE
from ..tome import apply_spec
from .onnx import OPSET, example_input, set_onnx_metadata, to_onnx
from .openvino import OvModel, ir_meta, onnx_to_ir, ov_precisions, quantize_ir, set_ir_metadata
from .ort import ORT_PRECISIONS, OrtModel, onnx_file, onnx_meta, ort_session, quantize_onnx_static
from .pytorch import load_model, load_torchscript, model_for_counting
from .tensorrt import TRT_PRECISIONS, TrtModel, build_engine, tensorrt_reason

RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
STATIC_INT8 = ("onnxruntime", "openvino")  # runtimes whose int8 is calibrated
CALIBRATION_IMAGES = 100  # training images a static int8 graph is calibrated on


def runtime_reason(runtime: str, device: torch.device | str) -> str | None:
    """Why ``runtime`` cannot run on ``device`` here, or None."""
    device = torch.device(device)
    if runtime not in RUNTIMES:
        return f"unknown runtime '{runtime}' (choose {', '.join(RUNTIMES)})"
    if runtime == "tensorrt":
        return tensorrt_reason(device)
    if runtime == "openvino":
        if device.type != "cpu":
            return "vitfab runs OpenVINO on CPUs only"
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "the openvino package is not installed"
    if runtime == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return "the onnxruntime package is not installed"
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime here has no CUDA provider (onnxruntime-gpu)"
    return None


def runtime_precisions(runtime: str, device: torch.device | str) -> tuple[str, ...]:
    """The precisions worth measuring in ``runtime`` on ``device``."""
    device = torch.device(device)
    if runtime == "torch":
        return tuple(p.value for p in useful_precisions(device))
    if runtime == "onnxruntime":
        return ORT_PRECISIONS if device.type == "cpu" else ("fp32",)
    if runtime == "openvino":
        return ov_precisions(device)
    return TRT_PRECISIONS if device.type == "cuda" else ()


def artifact_name(runtime: str, precision: str) -> str:
    """The file ``runtime`` runs ``precision`` from, in a deploy or work folder."""
    if runtime == "openvino":
        return OPENVINO_FILE if precision != "int8" else Path(OPENVINO_FILE).stem + INT8_SUFFIX + ".xml"
    if runtime == "tensorrt":
        return TENSORRT_FILE if precision == "fp32" else Path(TENSORRT_FILE).stem + f".{precision}.plan"
    return ONNX_FILE if precision != "int8" else Path(ONNX_FILE).stem + INT8_SUFFIX + ".onnx"


def convert(model: torch.nn.Module, runtime: str, precision: str, folder: str | Path,
            calibration: Sequence[np.ndarray] | None = None) -> Path:
    """Write (or find, where an earlier call wrote it) what ``runtime`` runs ``model`` (fp32, ToMe
    applied) in ``precision`` from, in ``folder``; int8 of OpenVINO and ONNX Runtime is calibrated
    on ``calibration`` (image batches, fp32 numpy)."""
    if runtime == "torch":
        raise VitfabError("PyTorch runs the checkpoint itself: nothing to convert")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        to_onnx(model, onnx_path)
    out = folder / artifact_name(runtime, precision)
    if out.is_file():
        return out
    if runtime == "onnxruntime":
        return quantize_onnx_static(onnx_path, calibration or [], out) if precision == "int8" else onnx_path
    if runtime == "openvino":
        ir = folder / OPENVINO_FILE
        if not ir.is_file():
            onnx_to_ir(onnx_path, ir)
        return quantize_ir(ir, calibration or [], out) if precision == "int8" else ir
    return build_engine(onnx_path, out, precision, model.vitfab_meta.preprocess.img_size)


@dataclass(frozen=True)
class Deployed:
    """One model as a runtime runs it: a checkpoint and ToMe schedule (torch) or an artifact."""

    runtime: str
    precision: str
    artifact: str  # torch: a checkpoint or run folder; else a file that ``convert`` wrote (or a deploy folder)
    tome: str | None = RECORDED  # torch only: the schedule applied to the checkpoint

    def build(self, device: torch.device | str = "cpu", threads: int | None = None) -> torch.nn.Module:
        if self.runtime == "torch":
            model = apply_spec(load_model(self.artifact, "cpu"), self.tome)
            return prepare_model(model, self.precision, device)
        if self.runtime == "onnxruntime":
            return OrtModel(self.artifact, device, self.precision, threads)
        if self.runtime == "openvino":
            return OvModel(self.artifact, self.precision, threads)
        if self.runtime == "tensorrt":
            return TrtModel(self.artifact, self.precision)
        raise VitfabError(runtime_reason(self.runtime, device) or self.runtime)


def load_deployed(path: str | Path, runtime: str = "torch", device: str | torch.device = "cpu",
                  precision: str = RECORDED) -> torch.nn.Module:
    """A deploy folder, checkpoint, ``.onnx`` or ``.xml`` file, ready to run in ``runtime``.

    ``precision``: "recorded" runs the mode saved with the model in PyTorch; in another runtime
    the recorded mode where that runtime runs it (a deploy folder chosen in int8 holds the int8
    graph), else fp32; a mode name forces it.
    """
    reason = runtime_reason(runtime, device)
    if reason:
        raise VitfabError(f"--runtime {runtime}: {reason}")
    p = Path(path)
    if runtime == "torch":
        if p.suffix in (".onnx", ".xml"):
            raise VitfabError(f"{p} is an exported graph: run it with --runtime onnxruntime or openvino")
        return load_model(p, device, precision)
    if precision == RECORDED:
        precision = _recorded_precision(p, runtime, device)
    if runtime == "onnxruntime":
        return OrtModel(p, device, precision)
    if runtime == "openvino":
        return OvModel(p, precision)
    return TrtModel(p if p.is_file() else p / artifact_name(runtime, precision), precision)


def _recorded_precision(path: Path, runtime: str, device) -> str:
    """The precision a deploy folder was chosen in, where ``runtime`` runs it and its artifact is there."""
    if not (path.is_dir() and (path / DEPLOY_FILE).is_file()):
        return "fp32"
    mode = read_json(path / DEPLOY_FILE).get("precision", "fp32")
    ok = mode in runtime_precisions(runtime, device) and (mode != "int8" or runtime == "onnxruntime"
                                                          or (path / artifact_name(runtime, mode)).is_file())
    return mode if ok else "fp32"


__all__ = ["CALIBRATION_IMAGES", "OPSET", "ORT_PRECISIONS", "RECORDED", "RUNTIMES", "STATIC_INT8", "Deployed", "OrtModel", "OvModel",
           "TrtModel", "artifact_name", "convert", "example_input", "ir_meta", "load_deployed", "load_model",
           "load_torchscript", "model_for_counting", "onnx_file", "onnx_meta", "ort_session", "runtime_precisions",
           "runtime_reason", "set_ir_metadata", "set_onnx_metadata", "tensorrt_reason", "to_onnx"]
