"""``vitfab predict``: classify image files or folders with a saved or exported model, to CSV.

Where the model's classes include good ones, each image also gets ``p_good`` and a ``decision``:
at the operating point recorded with the model (``vitfab run`` / ``vitfab calibrate``: temperature
and threshold), else at the argmax class (pass where it is a good class, p_good at temperature 1).
A flagged image is reported with its most likely defect class, a passed one with its most likely
good class; ``confidence`` and ``topk`` are the model's own (temperature 1) probabilities.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..data.images import (MAX_IMAGE_PIXELS, SKIP_HINT, check_max_pixels, is_image_file, list_images, load_image,
                           max_pixels_option, report_skipped, skip_bad_option)
from ..data.transforms import eval_transform
from ..errors import DataError, VitfabError
from ..files import write_text_atomic
from ..options import RECORDED, option
from ..precision import parse_precision
from ..progress import task
from ..runtime import autocast, resolve_device
from ..runtimes import RUNTIMES, load_deployed
from .metrics import good_classes
from .operating import OperatingPoint, p_good


@dataclass
class PredictConfig:
    checkpoint: str | None = option(None, help="A vitfab checkpoint or run folder.")
    model: str | None = option(None, help="A deploy folder (vitfab export) or .onnx file.")
    input: list[str] = option(default_factory=list, help="Image file or folder; repeatable.")
    out: str = option("preds.csv", help="CSV: file, class, confidence, topk, p_good, decision.")
    runtime: str = option("torch", help=f"One of {', '.join(RUNTIMES)} (onnxruntime: a deploy folder or .onnx file).")
    topk: int = option(3, help="How many classes to list per image.")
    batch_size: int = option(64, help="Images per forward pass.")
    skip_bad_images: bool = skip_bad_option()
    max_image_pixels: int = max_pixels_option()
    device: str = option("auto", help="auto, cpu or cuda.")
    precision: str = option(RECORDED, help="recorded (the mode saved with the model, e.g. by vitfab run; else fp32; "
                                           "fp32 in onnxruntime), fp32, fp16, bf16 or int8.")

    def run(self, progress: bool = True) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Classify every input image and write the CSV; returns (rows, skipped)."""
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --checkpoint PATH or --model DEPLOY_DIR_OR_ONNX")
        if self.topk < 1:
            raise VitfabError(f"--topk must be at least 1, got {self.topk}")
        check_max_pixels(self.max_image_pixels)
        device = resolve_device(self.device)
        precision = self.precision if self.precision == RECORDED else parse_precision(self.precision, False).value
        paths = expand_inputs(self.input)
        path = Path(self.model if self.model is not None else self.checkpoint)
        if not path.exists():
            raise VitfabError(f"{'model' if self.model is not None else 'checkpoint'} not found: {path}")
        net = load_deployed(path, self.runtime, device, precision)
        rows, skipped = predict_images(net, paths, device, self.batch_size, self.topk, self.skip_bad_images,
                                       progress=progress, max_pixels=self.max_image_pixels)
        write_predictions_csv(rows, self.out)
        return rows, skipped


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Folders (searched recursively for images) and files, in the order given."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise DataError(f"no images in folder {p}")
            paths.extend(found)
        elif p.is_file():
            if not is_image_file(p):
                raise DataError(f"not an image file (by extension): {p}")
            paths.append(p)
        else:
            raise DataError(f"input not found: {p}")
    if not paths:
        raise DataError("no input images given")
    return paths


@torch.inference_mode()
def predict_images(
    model: torch.nn.Module,
    paths: Sequence[Path],
    device: torch.device,
    batch_size: int = PredictConfig.batch_size,
    topk: int = PredictConfig.topk,
    skip_bad: bool = False,
    amp: str = "off",
    progress: bool = True,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One row per readable image: file, class, confidence and the top-k (class, prob)."""
    meta = model.vitfab_meta
    tf = eval_transform(meta.preprocess)
    k = max(1, min(topk, len(meta.classes)))
    decide = decision_rule(meta)
    model.eval()
    rows, skipped = [], []
    with task("predict", total=len(paths), enabled=progress) as advance:
        for start in range(0, len(paths), batch_size):
            batch, names = [], []
            for p in paths[start : start + batch_size]:
                try:
                    batch.append(tf(load_image(p, max_pixels)))
                    names.append(p)
                except DataError as exc:
                    if not skip_bad:
                        raise DataError(f"{exc} ({SKIP_HINT})") from None
                    skipped.append((str(p), str(exc)))
            if batch:
                with autocast(device, amp):
                    logits = model(torch.stack(batch).to(device))
                probs = logits.float().softmax(dim=-1).cpu()
                top_p, top_i = probs.topk(k, dim=-1)
                verdicts = decide(logits.float().cpu().numpy())
                for name, ps, idx, prob, verdict in zip(names, top_p.tolist(), top_i.tolist(), probs.numpy(),
                                                        verdicts):
                    reported = idx[0] if verdict is None else verdict[2]
                    rows.append({
                        "file": str(name),
                        "class": meta.classes[reported],
                        "confidence": float(prob[reported]),
                        "topk": [(meta.classes[i], p) for i, p in zip(idx, ps)],
                        "p_good": None if verdict is None else verdict[0],
                        "decision": None if verdict is None else ("pass" if verdict[1] else "flag"),
                    })
            advance(min(batch_size, len(paths) - start))
    report_skipped(skipped)
    return rows, skipped


def decision_rule(meta) -> Callable[[np.ndarray], list[tuple[float, bool, int] | None]]:
    """``logits -> [(p_good, passed, reported class index) or None per image]``: at the recorded
    operating point, else at the argmax class; all None where no class may pass."""
    recorded = meta.extra.get("operating_point")
    op = OperatingPoint.from_dict(recorded) if recorded else None
    good = op.good_indices(meta.classes) if op else good_classes(meta.classes)
    if not good:
        return lambda logits: [None] * len(logits)
    defect = [i for i in range(len(meta.classes)) if i not in good]

    def rule(logits: np.ndarray):
        pg = p_good(logits, op.temperature if op else 1.0, good)
        passed = pg >= op.threshold if op else np.isin(logits.argmax(1), good)
        out = []
        for z, p, ok in zip(logits, pg, passed):
            among = good if ok else defect
            out.append((float(p), bool(ok), among[int(np.argmax(z[among]))]))
        return out

    return rule


def write_predictions_csv(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Columns: file, class, confidence, topk (``class:prob`` joined by ``|``), p_good and
    decision (pass / flag; empty where the model has no good class)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class", "confidence", "topk", "p_good", "decision"])
    for r in rows:
        w.writerow([r["file"], r["class"], f"{r['confidence']:.6f}",
                    "|".join(f"{c}:{p:.6f}" for c, p in r["topk"]),
                    "" if r.get("p_good") is None else f"{r['p_good']:.6f}", r.get("decision") or ""])
    write_text_atomic(out, buf.getvalue())
    return Path(out)
