"""``vitfab export``: a model as a ``deploy/`` folder that runs outside vitfab's training code.

deploy/
  model.safetensors + meta.json   the weights and what rebuilds them (a vitfab checkpoint folder:
                                  ``vitfab.load_model("deploy/")`` works)
  model.onnx                      ONNX (opset >= 17), dynamic batch, ToMe's matching and merges in
                                  the graph; the metadata JSON rides in the model's metadata_props
  model.ts                        TorchScript (traced), dynamic batch
  deploy.json                     classes, preprocessing, architecture, ToMe schedule, precision,
                                  operating point (temperature and reject threshold, where
                                  recorded), files, and the parity measured at export (max |logit difference|
                                  of each format against PyTorch fp32 on a batch of a size not
                                  used for tracing)

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

import torch

from ..errors import VitfabError
from ..files import atomic_dir, write_json_atomic, writing
from ..models.checkpoint import write_checkpoint
from ..options import option
from ..rundir import DEPLOY_FILE, ONNX_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, kind_of
from ..runtimes import load_model, load_torchscript, ort_session
from ..tome import tome_info

FORMATS = ("safetensors", "torchscript", "onnx")
FILES = {"safetensors": WEIGHTS_FILE, "torchscript": TORCHSCRIPT_FILE, "onnx": ONNX_FILE}
DEPLOY_FORMAT = "vitfab-deploy/1"
OPSET = 17
PARITY_TOLERANCE = 1e-3  # max |logit difference| against PyTorch fp32 that every format must meet


@dataclass
class ExportConfig:
    """``vitfab export``: which model, where to, in which formats."""

    model: str | None = option(None, help="A vitfab checkpoint, run folder or main-job run (its chosen model).")
    out: str = option("deploy", help="The deploy folder to write (replaced atomically).")
    format: str = option(",".join(FORMATS), help="Comma list of safetensors, torchscript, onnx.")
    opset: int = option(OPSET, help="ONNX opset (>= 17).")
    tolerance: float = option(PARITY_TOLERANCE, help="Max |logit difference| against PyTorch fp32 each format must meet.")

    def run(self) -> dict[str, Any]:
        if self.model is None:
            raise VitfabError("--model is required: a checkpoint, run folder or main-job run")
        if not Path(self.model).exists():
            raise VitfabError(f"not found: {self.model}")
        return export_deploy(self.model, self.out, parse_formats(self.format), self.opset, self.tolerance)


def parse_formats(value: str | Sequence[str]) -> list[str]:
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise VitfabError(f"--format takes a comma list of {', '.join(FORMATS)}; got '{','.join(items) or value}'")
    return list(dict.fromkeys(items))


def example_input(model, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.vitfab_meta.preprocess.img_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_onnx(model, path: Path, opset: int = OPSET, metadata: dict[str, Any] | None = None) -> Path:
    """The fp32 model (ToMe included) as ONNX with a dynamic batch axis."""
    if opset < 17:
        raise VitfabError(f"--opset must be >= 17 (LayerNormalization), got {opset}")
    x = example_input(model, 2)
    with warnings.catch_warnings():  # tracer notes on Python ints derived from shapes: token counts are static
        warnings.simplefilter("ignore")
        with writing(path):  # the exporter's C++ writer may not say that the disk is full
            torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    return set_onnx_metadata(path, path, metadata or {})


def set_onnx_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> Path:
    """``src`` as ``dst`` with these metadata_props entries set (others kept)."""
    import onnx

    proto = onnx.load(str(src))
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in metadata]
    del proto.metadata_props[:]
    for key, value in kept + list(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with writing(dst):
        onnx.save(proto, str(dst))
    return dst


def export_torchscript(model, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example_input(model, 2),), check_trace=False)
    with writing(path):
        traced.save(str(path))
    return path


@torch.inference_mode()
def parity(model, folder: Path, formats: Sequence[str], batch: int = 3) -> dict[str, float]:
    """Max |logit difference| of each exported format against PyTorch fp32, on a batch size the
    export did not trace with (so the dynamic batch axis is exercised)."""
    x = example_input(model, batch, seed=1)
    ref = model(x).float()
    out: dict[str, float] = {}
    if "onnx" in formats:
        sess = ort_session(folder / FILES["onnx"])
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        out["onnx"] = float((got - ref).abs().max())
    if "torchscript" in formats:
        ts = load_torchscript(folder / FILES["torchscript"])
        out["torchscript"] = float((ts(x).float() - ref).abs().max())
    return out


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


def export_deploy(source: str | Path, out: str | Path, formats: Sequence[str] = FORMATS, opset: int = OPSET,
                  tolerance: float = PARITY_TOLERANCE, model=None) -> dict[str, Any]:
    """``source`` (a checkpoint or run folder; or ``model``, an fp32 vitfab model) -> ``out``.

    The folder appears complete or not at all. Fails (and writes nothing) where a format's logits
    differ from PyTorch's by more than ``tolerance``. A ``model`` given is used as it is (put in
    fp32 and eval mode, in place).
    """
    formats = parse_formats(formats)
    check_out(source, out)
    if model is None:
        model = load_model(source, "cpu")
    model = model.float().eval()
    meta = model.vitfab_meta
    precision = meta.extra.get("precision", "fp32")
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        meta_dict = write_checkpoint(tmp, model, {"precision": precision})  # safetensors + meta.json
        if "onnx" in formats:
            export_onnx(model, tmp / FILES["onnx"], opset, {"vitfab": json.dumps(meta_dict)})
        if "torchscript" in formats:
            export_torchscript(model, tmp / FILES["torchscript"])
        diffs = parity(model, tmp, formats)
        bad = {k: v for k, v in diffs.items() if not v <= tolerance}
        if bad:
            raise VitfabError(f"export parity failed: max |logit difference| {bad} > {tolerance} against PyTorch fp32")
        info = {
            "format": DEPLOY_FORMAT, "source": str(source), "classes": list(meta.classes),
            "preprocess": meta.preprocess.to_dict(), "model": {"name": meta.name, "kwargs": meta.kwargs},
            "tome": tome_info(model), "precision": precision, "operating_point": meta.extra.get("operating_point"),
            "opset": opset if "onnx" in formats else None,
            "files": {f: FILES[f] for f in ["safetensors", *formats] if f in FILES},
            "parity_max_abs_diff": diffs, "parity_tolerance": tolerance, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(tmp / DEPLOY_FILE, info)
    return info
