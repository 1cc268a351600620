"""OpenVINO (CPU): an ONNX graph or IR behind the call of a vitfab model.

The IR (``model.xml`` + ``model.bin``) is converted from vitfab's ONNX graph with fp32 weights
(OpenVINO's default would compress them to fp16) and vitfab's metadata in its ``rt_info``. Its
precisions are explicit, never OpenVINO's default (bf16 wherever the CPU has it): fp32 runs with
``INFERENCE_PRECISION_HINT=f32``, bf16 with ``bf16`` (only where the CPU has native bf16), int8 is
an IR that NNCF quantised statically on calibration images (its remaining float ops run f32).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import redirect_stdout
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import VitfabError
from ..files import writing
from ..models.meta import ModelMeta
from ..rundir import INT8_SUFFIX, ONNX_FILE, OPENVINO_FILE
from .ort import onnx_meta

META_KEY = "vitfab"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def _ov():
    try:
        import openvino
    except ImportError:
        raise VitfabError("the openvino runtime needs the openvino package (pip install openvino)") from None
    return openvino


def ov_precisions(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """What OpenVINO runs here: fp32 and int8 on every x86 CPU, bf16 where the CPU has it natively."""
    if torch.device(device).type != "cpu":
        return ()
    caps = _ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ("fp32",) + (("bf16",) if "BF16" in caps else ()) + ("int8",)


def ir_meta(path: str | Path) -> ModelMeta:
    model = _ov().Core().read_model(str(path))
    if not model.has_rt_info([META_KEY]):
        raise VitfabError(f"{path} was not converted by vitfab (no 'vitfab' rt_info): classes and preprocessing unknown")
    return ModelMeta.from_dict(json.loads(model.get_rt_info([META_KEY]).astype(str)))


def _save_ir(model, path: Path, meta_json: str) -> Path:
    ov = _ov()
    model.set_rt_info(meta_json, [META_KEY])
    with writing(path):
        ov.save_model(model, str(path), compress_to_fp16=False)
    return path


def set_ir_metadata(src: str | Path, dst: str | Path, meta_json: str) -> Path:
    """The IR ``src`` (and its .bin) as ``dst`` with vitfab's metadata replaced."""
    return _save_ir(_ov().Core().read_model(str(src)), Path(dst), meta_json)


def onnx_to_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """vitfab's ONNX graph as an fp32 OpenVINO IR, its metadata carried over."""
    import onnx

    ov = _ov()
    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = next((e.value for e in proto.metadata_props if e.key == META_KEY), None)
    if meta is None:
        raise VitfabError(f"{onnx_path} was not exported by vitfab (no 'vitfab' metadata)")
    return _save_ir(ov.Core().read_model(str(onnx_path)), Path(xml_path), meta)


def quantize_ir(xml_path: str | Path, calibration: Sequence[np.ndarray], out: str | Path) -> Path:
    """NNCF's static post-training int8 quantisation of an fp32 IR (transformer preset: LayerNorm,
    softmax and the merging's gathers stay float), calibrated on ``calibration`` (image batches)."""
    import nncf

    if not calibration:
        raise VitfabError("OpenVINO int8 needs calibration images")
    ov = _ov()
    nncf.set_log_level(logging.ERROR)
    src = ov.Core().read_model(str(xml_path))
    meta = src.get_rt_info([META_KEY]).astype(str)
    items = [b[i: i + 1] for b in calibration for i in range(len(b))]
    with open(os.devnull, "w") as null, redirect_stdout(null):  # its own progress bars, on stdout
        q = nncf.quantize(src, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
    return _save_ir(q, Path(out), meta)


def ir_file(path: str | Path, precision: str = "fp32") -> Path:
    """The IR of a deploy folder in ``precision`` (int8: ``model.int8.xml``), or the file itself."""
    p = Path(path)
    if p.is_file() and p.suffix == ".xml":
        return p
    name = OPENVINO_FILE if precision != "int8" else Path(OPENVINO_FILE).stem + INT8_SUFFIX + ".xml"
    if p.is_dir() and (p / name).is_file():
        return p / name
    if p.is_dir() and (p / ONNX_FILE).is_file():
        raise VitfabError(f"{p} holds no {name} (export it with --format openvino"
                          + (" from a model chosen in int8" if precision == "int8" else "") + ")")
    raise VitfabError(f"no OpenVINO IR at {p}: give a deploy folder (vitfab export --format openvino) or an .xml file")


class OvModel(torch.nn.Module):
    """A compiled IR (or ONNX file): fp32 images in, fp32 logits out, ``vitfab_meta`` set."""

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        super().__init__()
        if precision not in HINTS:
            raise VitfabError(f"openvino runs fp32, bf16 or int8 here, not {precision}")
        if precision == "bf16" and "bf16" not in ov_precisions():
            raise VitfabError("this CPU has no native bf16: OpenVINO would run fp32 (use fp32 or int8)")
        ov = _ov()
        p = Path(path)
        self.path = p if p.suffix in (".xml", ".onnx") else ir_file(p, precision)
        if precision == "int8" and INT8_SUFFIX not in self.path.name:
            raise VitfabError(f"{self.path} is not an int8 IR: OpenVINO int8 runs a graph that NNCF quantised "
                              f"(vitfab export of a model chosen in int8, or vitfab bench on a checkpoint)")
        self.vitfab_meta = ir_meta(self.path) if self.path.suffix == ".xml" else onnx_meta(self.path)
        self.num_classes = len(self.vitfab_meta.classes)
        self.vitfab_precision = precision
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path, self.path.with_suffix(".bin")) if f.is_file())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(np.array(out)).to(x.device)
