"""``vitfab predict``: classify image files or folders with a saved or exported model, to CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..data.images import SKIP_HINT, is_image_file, list_images, load_image, report_skipped
from ..data.transforms import eval_transform
from ..errors import DataError, VitfabError
from ..files import write_text_atomic
from ..options import RECORDED, option
from ..precision import parse_precision
from ..progress import task
from ..runtime import autocast, resolve_device
from ..runtimes import RUNTIMES, load_deployed


@dataclass
class PredictConfig:
    checkpoint: str | None = option(None, help="A vitfab checkpoint or run folder.")
    model: str | None = option(None, help="A deploy folder (vitfab export) or .onnx file.")
    input: list[str] = option(default_factory=list, help="Image file or folder; repeatable.")
    out: str = option("preds.csv", help="CSV: file, class, confidence, topk.")
    runtime: str = option("torch", help=f"One of {', '.join(RUNTIMES)} (onnxruntime: a deploy folder or .onnx file).")
    topk: int = option(3, help="How many classes to list per image.")
    batch_size: int = option(64, help="Images per forward pass.")
    skip_bad_images: bool = option(False, help="Skip unreadable images with a warning.")
    device: str = option("auto", help="auto, cpu or cuda.")
    precision: str = option(RECORDED, help="recorded (the mode saved with the model, e.g. by vitfab run; else fp32; "
                                           "fp32 in onnxruntime), fp32, fp16, bf16 or int8.")

    def run(self, progress: bool = True) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Classify every input image and write the CSV; returns (rows, skipped)."""
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --checkpoint PATH or --model DEPLOY_DIR_OR_ONNX")
        if self.topk < 1:
            raise VitfabError(f"--topk must be at least 1, got {self.topk}")
        device = resolve_device(self.device)
        precision = self.precision if self.precision == RECORDED else parse_precision(self.precision, False).value
        paths = expand_inputs(self.input)
        path = Path(self.model if self.model is not None else self.checkpoint)
        if not path.exists():
            raise VitfabError(f"{'model' if self.model is not None else 'checkpoint'} not found: {path}")
        net = load_deployed(path, self.runtime, device, precision)
        rows, skipped = predict_images(net, paths, device, self.batch_size, self.topk, self.skip_bad_images,
                                       progress=progress)
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
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """One row per readable image: file, class, confidence and the top-k (class, prob)."""
    meta = model.vitfab_meta
    tf = eval_transform(meta.preprocess)
    k = max(1, min(topk, len(meta.classes)))
    model.eval()
    rows, skipped = [], []
    with task("predict", total=len(paths), enabled=progress) as advance:
        for start in range(0, len(paths), batch_size):
            batch, names = [], []
            for p in paths[start : start + batch_size]:
                try:
                    batch.append(tf(load_image(p)))
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
                for name, ps, idx in zip(names, top_p.tolist(), top_i.tolist()):
                    rows.append({
                        "file": str(name),
                        "class": meta.classes[idx[0]],
                        "confidence": ps[0],
                        "topk": [(meta.classes[i], p) for i, p in zip(idx, ps)],
                    })
            advance(min(batch_size, len(paths) - start))
    report_skipped(skipped)
    return rows, skipped


def write_predictions_csv(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Columns: file, class, confidence, topk (``class:prob`` joined by ``|``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class", "confidence", "topk"])
    for r in rows:
        w.writerow([r["file"], r["class"], f"{r['confidence']:.6f}",
                    "|".join(f"{c}:{p:.6f}" for c, p in r["topk"])])
    write_text_atomic(out, buf.getvalue())
    return Path(out)
