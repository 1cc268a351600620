"""ONNX Runtime: an exported model (a deploy folder or an ``.onnx`` file) behind the call of a
vitfab model.

``OrtModel`` takes fp32 images and returns fp32 logits with ``vitfab_meta`` set, so ``predict``,
``bench`` and the evaluation code take it as they take a PyTorch model. The CPU provider runs
fp32, and int8: a statically quantised graph (QDQ, calibrated on training images) where one was
made (``model.int8.onnx`` beside the fp32 one), else ONNX Runtime's dynamic quantisation of the
weights; CUDA's provider where asked for.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import VitfabError
from ..models.meta import ModelMeta
from ..files import writing
from ..rundir import DEPLOY_FILE, INT8_SUFFIX, ONNX_FILE

ORT_PRECISIONS = ("fp32", "int8")


def onnx_meta(path: str | Path) -> ModelMeta:
    """The vitfab metadata stored in an exported model's metadata_props."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == "vitfab":
            return ModelMeta.from_dict(json.loads(entry.value))
    raise VitfabError(f"{path} was not exported by vitfab (no 'vitfab' metadata): classes and preprocessing unknown")


def onnx_file(path: str | Path) -> Path:
    """A deploy folder's ONNX model, or the file itself."""
    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        return p
    if p.is_dir() and (p / ONNX_FILE).is_file():
        return p / ONNX_FILE
    if p.is_dir() and (p / DEPLOY_FILE).is_file():
        raise VitfabError(f"{p} holds no {ONNX_FILE} (export it with --format onnx)")
    raise VitfabError(f"no ONNX model at {p}: give a deploy folder (vitfab export) or an .onnx file")


def ort_session(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
    """An ONNX Runtime session on the CPU provider, or CUDA's where asked for and present;
    ``threads``: its intra-op pool (default: ONNX Runtime's, one per core)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitfabError("the onnxruntime runtime needs the onnxruntime package (pip install onnxruntime)") from None
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise VitfabError("onnxruntime here has no CUDA provider (install onnxruntime-gpu) -- use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's worker threads spin after each run by default, taking the cores from whatever runs next
    # (interleaved PyTorch configurations measured 6-10x slower at batch 1); they sleep instead
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=providers)


class _QuietRoot:
    """ONNX Runtime's quantiser writes its advice (pre-process the graph, biases that are not
    initializers) to the root logger."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def quantize_onnx_int8(path: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the MatMul/Gemm weights, into a temporary file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(tempfile.mkdtemp(prefix="vitfab-ort-")) / "model.int8.onnx"
    with _QuietRoot():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def quantize_onnx_static(path: str | Path, calibration: Sequence[np.ndarray], out: str | Path) -> Path:
    """ONNX Runtime's static int8 quantisation (QDQ, int8 weights per channel and activations),
    its activation ranges calibrated on ``calibration`` (image batches); metadata kept."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise VitfabError("ONNX Runtime static int8 needs calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": b} for b in calibration])

        def get_next(self):
            return next(self.items, None)

    out = Path(out)
    with _QuietRoot(), writing(out):
        quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def static_int8_file(path: str | Path) -> Path | None:
    """The statically quantised graph beside an ONNX model (or the file, where it is one), else None."""
    p = Path(path)
    if p.is_file():
        return p if p.name.endswith(INT8_SUFFIX + ".onnx") else None
    candidate = p / (Path(ONNX_FILE).stem + INT8_SUFFIX + ".onnx")
    return candidate if candidate.is_file() else None


class OrtModel(torch.nn.Module):
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                 threads: int | None = None):
        super().__init__()
        if precision not in ORT_PRECISIONS:
            raise VitfabError(f"onnxruntime runs {' or '.join(ORT_PRECISIONS)} here, not {precision}")
        static = static_int8_file(path) if precision == "int8" else None
        self.path = static or onnx_file(path)
        self.vitfab_meta = onnx_meta(self.path)
        self.num_classes = len(self.vitfab_meta.classes)
        self.vitfab_precision = precision
        self.int8_method = None if precision != "int8" else ("static" if static else "dynamic")
        self.run_path = quantize_onnx_int8(self.path) if self.int8_method == "dynamic" else self.path
        self.session = ort_session(self.run_path, device, threads)
        if self.run_path != self.path:  # the quantised copy lives as long as the session needs it
            weakref.finalize(self, shutil.rmtree, str(self.run_path.parent), True)

    @property
    def file_bytes(self) -> int:
        return Path(self.run_path).stat().st_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"images": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
