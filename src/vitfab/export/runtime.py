"""Running exported models: a deploy folder or an ``.onnx`` file, in PyTorch or ONNX Runtime.

``OrtModel`` puts an ONNX Runtime session behind the call of a vitfab model (fp32 images in,
fp32 logits out, ``vitfab_meta`` set), so ``predict``, ``bench`` and the evaluation code take it
as they take a PyTorch model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..errors import VitfabError
from ..models.meta import ModelMeta
from .deploy import DEPLOY_FILE, FILES, ort_session

RUNTIMES = ("torch", "onnxruntime")
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
    if p.is_dir() and (p / FILES["onnx"]).is_file():
        return p / FILES["onnx"]
    if p.is_dir() and (p / DEPLOY_FILE).is_file():
        raise VitfabError(f"{p} holds no {FILES['onnx']} (export it with --format onnx)")
    raise VitfabError(f"no ONNX model at {p}: give a deploy folder (vitfab export) or an .onnx file")


def quantize_onnx_int8(path: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the MatMul/Gemm weights, into a temporary file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(tempfile.mkdtemp(prefix="vitfab-ort-")) / "model.int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph goes to the root logger
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


class OrtModel(torch.nn.Module):
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"):
        super().__init__()
        if precision not in ORT_PRECISIONS:
            raise VitfabError(f"onnxruntime runs {' or '.join(ORT_PRECISIONS)} here, not {precision}")
        self.path = onnx_file(path)
        self.vitfab_meta = onnx_meta(self.path)
        self.num_classes = len(self.vitfab_meta.classes)
        self.vitfab_precision = precision
        self.run_path = quantize_onnx_int8(self.path) if precision == "int8" else self.path
        self.session = ort_session(self.run_path, device)
        if self.run_path != self.path:  # the quantised copy lives as long as the session needs it
            weakref.finalize(self, shutil.rmtree, str(self.run_path.parent), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"images": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def torch_twin(path: str | Path):
    """The PyTorch model of an export, for counting params and MACs: the deploy folder's weights
    where they lie beside the ONNX file, else the architecture rebuilt from the file's metadata
    (random weights; counts do not depend on them). ToMe applied as exported."""
    from ..models import load_model
    from ..models.checkpoint import model_from_meta

    p = onnx_file(path)
    if (p.parent / FILES["safetensors"]).is_file() and (p.parent / DEPLOY_FILE).is_file():
        return load_model(p.parent)
    return model_from_meta(onnx_meta(p))


def load_deployed(path: str | Path, runtime: str = "torch", device: str | torch.device = "cpu",
                  precision: str = "recorded") -> torch.nn.Module:
    """A deploy folder, checkpoint or ``.onnx`` file, ready to run in ``runtime``.

    ``precision``: "recorded" runs the mode saved with the model in PyTorch (fp32 in ONNX Runtime,
    where bf16 has no CPU kernels); a mode name forces it.
    """
    if runtime not in RUNTIMES:
        raise VitfabError(f"--runtime must be torch or onnxruntime, got '{runtime}'")
    if runtime == "onnxruntime":
        return OrtModel(path, device, "fp32" if precision == "recorded" else precision)
    p = Path(path)
    if p.suffix == ".onnx":
        raise VitfabError(f"{p} is an ONNX file: run it with --runtime onnxruntime")
    from ..models import load_model

    return load_model(p, device, precision)
