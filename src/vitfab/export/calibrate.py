"""``vitfab calibrate``: re-fit a model's operating point (temperature and reject threshold) on new
labelled line data, without retraining.

The model runs as it is deployed (its recorded precision in PyTorch, or ONNX Runtime for a deploy
folder), the operating point is fitted to the ceilings given (``evaluate.operating``), and the
folder is rewritten atomically with only the operating point changed: the safetensors metadata
and meta.json of a checkpoint, and also the ONNX metadata and deploy.json of a deploy folder.
The weights are copied bit for bit. ``calibration.json`` in the folder keeps the before / after.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.images import max_pixels_option, scan_checked, skip_bad_option
from ..errors import DataError, VitfabError
from ..evaluate.metrics import argmax_rates, good_classes
from ..evaluate.operating import DEFAULT_MAX_OVERKILL, Ceilings, OperatingPoint, fit_operating_point, operating_metrics
from ..evaluate.runner import collect_logits, make_eval_loader
from ..files import atomic_dir, read_json, write_json_atomic
from ..models.checkpoint import copy_with_meta, read_meta
from ..options import RECORDED, option
from ..rundir import DEPLOY_FILE, META_FILE, WEIGHTS_FILE, kind_of
from ..runtime import resolve_device
from ..runtimes import RUNTIMES, load_deployed, set_ir_metadata, set_onnx_metadata


CALIBRATION_FILE = "calibration.json"


@dataclass
class CalibrateConfig:
    model: str | None = option(None, help="A vitfab checkpoint folder (e.g. RUN/chosen) or deploy folder "
                                          "(vitfab export): its operating point is rewritten in place.")
    data: str | None = option(None, help="New labelled line images: class folders named after the model's classes.")
    max_escape: float | None = option(None, help="Escape ceiling, percent of the defective images that may pass.")
    max_overkill: float = option(DEFAULT_MAX_OVERKILL, help="Overkill ceiling, percent of the good images flagged.")
    min_recall: list[str] = option(default_factory=list, help="Recall floor CLASS=R of a defect class; repeatable.")
    good_class: str | None = option(None, help="The classes that may pass, a comma list [default: the recorded "
                                               "operating point's, else a class named good/normal/ok].")
    runtime: str = option("torch", help=f"Whose outputs are calibrated: {', '.join(RUNTIMES)} (onnxruntime: a "
                                        "deploy folder).")
    batch_size: int = option(64, help="Images per forward pass.")
    skip_bad_images: bool = skip_bad_option()
    max_image_pixels: int = max_pixels_option()
    device: str = option("auto", help="auto, cpu or cuda.")

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Fit and write; returns the before / after record (also written as calibration.json)."""
        folder = self._folder()
        ceilings = Ceilings.from_percent(self.max_escape, self.max_overkill, self.min_recall)
        if self.data is None or not Path(self.data).is_dir():
            raise VitfabError(f"--data must be a folder of labelled images, got {self.data}")
        device = resolve_device(self.device)
        model = load_deployed(folder, self.runtime, device, RECORDED)
        meta = model.vitfab_meta
        old = meta.extra.get("operating_point")
        spec = self.good_class or (",".join(old["good_classes"]) if old else None)
        good = good_classes(meta.classes, spec)
        if not good:
            raise VitfabError(f"none of the model's classes ({', '.join(meta.classes)}) is named good/normal/ok: "
                              f"name the passable ones with --good-class")
        ceilings.check(meta.classes, good)
        index = scan_checked(self.data, self.skip_bad_images, progress, classes=list(meta.classes),
                             max_pixels=self.max_image_pixels)
        if not index.samples:
            raise DataError(f"no images of the model's classes in {self.data}")
        loader = make_eval_loader(self.data, index.samples, meta.preprocess, self.batch_size)
        logits, targets = collect_logits(model, loader, device, progress=progress, description="calibrate")
        new = fit_operating_point(logits, targets, meta.classes, good, ceilings,
                                  fitted_on=f"{Path(self.data).resolve()} ({len(targets)} images)")
        record = {"data": str(Path(self.data).resolve()), "images": int(len(targets)), "runtime": self.runtime,
                  "ceilings": ceilings.describe(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "argmax": argmax_rates(targets, logits.argmax(1), good),
                  "before": None if not old else operating_metrics(OperatingPoint.from_dict(old), logits, targets,
                                                                   meta.classes),
                  "after": operating_metrics(new, logits, targets, meta.classes), "met": new.met,
                  "shortfall": new.shortfall, "operating_point": new.to_dict()}
        write_operating_point(folder, new.to_dict(), record)
        return record

    def _folder(self) -> Path:
        if self.model is None:
            raise VitfabError("--model is required: a checkpoint folder (e.g. RUN/chosen) or a deploy folder")
        p = Path(self.model)
        kind = kind_of(p)
        if kind == "main":
            raise VitfabError(f"{p} is a main-job run: give its chosen model ({p / 'chosen'}) or its deploy folder "
                              f"({p / 'deploy'})")
        if kind not in ("checkpoint", "deploy"):
            raise VitfabError(f"--model {p}: not a vitfab checkpoint or deploy folder")
        return p


def _rates(r: dict[str, Any] | None) -> str:
    return ("-" if r is None else f"escape {100 * r['escape_rate']:.2f} % ({r['escapes']}/{r['n_defective']}, upper "
            f"bound {100 * r['escape_upper']:.2f} %), overkill {100 * r['overkill_rate']:.2f} % ({r['flagged_good']}/"
            f"{r['n_good']}, upper bound {100 * r['overkill_upper']:.2f} %)")


def record_lines(record: dict[str, Any], where: str) -> list[str]:
    """The before / after of a calibration, for the terminal."""
    op = record["operating_point"]
    return [f"{record['images']} images of {record['data']}, ceilings {record['ceilings']}",
            f"before (recorded operating point): {_rates(record['before'])}",
            f"after  (p_good >= {op['threshold']:.4f}, T = {op['temperature']:.3f}): {_rates(record['after'])}",
            ("ceilings met" if record["met"] else f"ceilings NOT met: {record['shortfall']}")
            + f"; written into {where}"]


def write_operating_point(folder: str | Path, op: dict[str, Any], record: dict[str, Any] | None = None) -> None:
    """Rewrite ``folder`` (a checkpoint or deploy folder) atomically with ``op`` as its operating
    point wherever the folder records metadata; every other byte as it was."""
    folder = Path(folder)
    meta = read_meta(folder / WEIGHTS_FILE).to_dict() | {"operating_point": op}
    with atomic_dir(folder) as tmp:
        for item in folder.iterdir():
            dst = tmp / item.name
            if item.name == WEIGHTS_FILE:
                copy_with_meta(item, dst, meta)
            elif item.name in (META_FILE, DEPLOY_FILE):
                write_json_atomic(dst, read_json(item) | {"operating_point": op})
            elif item.suffix == ".onnx":  # model.onnx and a statically quantised model.int8.onnx
                set_onnx_metadata(item, dst, {"vitfab": json.dumps(meta)})
            elif item.suffix == ".xml":  # OpenVINO IR: the metadata in its rt_info (its .bin written with it)
                set_ir_metadata(item, dst, json.dumps(meta))
            elif item.suffix == ".bin" and item.with_suffix(".xml").is_file():
                continue
            elif item.is_dir():
                shutil.copytree(item, dst)
            elif item.name != CALIBRATION_FILE:
                shutil.copy2(item, dst)
        if record is not None:
            write_json_atomic(tmp / CALIBRATION_FILE, record)
