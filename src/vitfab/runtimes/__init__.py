"""Deploy runtimes: each turns a saved model or an exported artifact into a callable with fp32
images in, fp32 logits out and ``vitfab_meta`` set -- PyTorch eager (``pytorch``) and ONNX
Runtime (``ort``)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VitfabError
from ..options import RECORDED
from .ort import ORT_PRECISIONS, OrtModel, onnx_file, onnx_meta, ort_session
from .pytorch import load_model, load_torchscript, model_for_counting

RUNTIMES = ("torch", "onnxruntime")


def load_deployed(path: str | Path, runtime: str = "torch", device: str | torch.device = "cpu",
                  precision: str = RECORDED) -> torch.nn.Module:
    """A deploy folder, checkpoint or ``.onnx`` file, ready to run in ``runtime``.

    ``precision``: "recorded" runs the mode saved with the model in PyTorch (fp32 in ONNX Runtime,
    where bf16 has no CPU kernels); a mode name forces it.
    """
    if runtime not in RUNTIMES:
        raise VitfabError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if runtime == "onnxruntime":
        return OrtModel(path, device, "fp32" if precision == RECORDED else precision)
    p = Path(path)
    if p.suffix == ".onnx":
        raise VitfabError(f"{p} is an ONNX file: run it with --runtime onnxruntime")
    return load_model(p, device, precision)


__all__ = ["ORT_PRECISIONS", "RECORDED", "RUNTIMES", "OrtModel", "load_deployed", "load_model", "load_torchscript",
           "model_for_counting", "onnx_file", "onnx_meta", "ort_session"]
