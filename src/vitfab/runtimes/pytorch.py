"""PyTorch eager, the reference runtime: a saved model loaded as it was chosen.

``load_model`` is what ``vitfab.load_model`` is: the checkpoint (``models.load_checkpoint``) with
its recorded ToMe schedule re-applied and, where asked, prepared in a precision mode -- the mode
recorded with it (``vitfab run``'s choice) or one named. It sits above ``models``, ``tome`` and
``precision`` because it uses all three; ``models`` itself knows neither merging nor bit-widths.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from ..models.checkpoint import load_checkpoint, model_from_meta
from ..options import RECORDED
from ..precision import prepare_model, unsupported_reason
from ..progress import console
from ..rundir import DEPLOY_FILE, WEIGHTS_FILE
from ..tome import apply_recorded
from .openvino import ir_meta
from .ort import onnx_file, onnx_meta


def load_model(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None) -> VisionTransformer:
    """Rebuild a model saved by vitfab (run folder, main-job run, checkpoint or deploy folder,
    ``.safetensors`` file); eval mode, ``model.vitfab_meta`` set, a recorded ToMe schedule re-applied.

    ``precision``: None keeps fp32 weights; a mode (fp16, bf16, int8) returns a copy prepared to
    run in it; ``"recorded"`` uses the mode saved with the checkpoint, or fp32 where none was saved
    or the recorded mode cannot run on ``device`` (with a note).
    """
    model = load_checkpoint(path, device)
    apply_recorded(model, model.vitfab_meta.extra.get("tome"))
    if precision is None:
        return model
    mode = model.vitfab_meta.extra.get("precision", "fp32") if precision == RECORDED else precision
    reason = unsupported_reason(mode, torch.device(device))
    if reason and precision == RECORDED:
        console.print(f"note: {path} was chosen to run in {mode}, which cannot run here ({reason}); using fp32")
        return model
    return model if mode == "fp32" else prepare_model(model, mode, device)


def model_for_counting(path: str | Path) -> VisionTransformer:
    """The PyTorch model of an ONNX or OpenVINO export, for counting params and MACs: the deploy folder's
    weights where they lie beside the file, else the architecture rebuilt from the file's
    metadata (random weights; counts do not depend on them). ToMe applied as exported."""
    p = Path(path) if Path(path).suffix == ".xml" else onnx_file(path)
    if (p.parent / WEIGHTS_FILE).is_file() and (p.parent / DEPLOY_FILE).is_file():
        return load_model(p.parent)
    model = model_from_meta(ir_meta(p) if p.suffix == ".xml" else onnx_meta(p))
    return apply_recorded(model, model.vitfab_meta.extra.get("tome"))


def load_torchscript(path: str | Path):
    """A traced model (torch 2.9+ flags TorchScript as deprecated in favour of torch.export; it loads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))
