"""Evaluation entry points behind ``vitfab eval``: a run's split, or any labelled folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..data.images import scan_checked
from ..data.split import Split
from ..errors import DataError
from ..files import write_json_atomic
from ..models.checkpoint import load_model
from ..rundir import RunDir
from .runner import evaluate_model, plot_confusion

MAX_CLASSES_IN_FULL = 50  # beyond this (ImageNet), only classes that occur are listed


def _compact(m: dict[str, Any]) -> dict[str, Any]:
    if len(m["classes"]) <= MAX_CLASSES_IN_FULL:
        return m
    m = dict(m)
    m["per_class"] = {c: v for c, v in m["per_class"].items() if v["support"] > 0}
    m.pop("confusion_matrix")
    return m


def evaluate_run(
    run_dir: str | Path,
    subset: str = "test",
    data: str | Path | None = None,
    device: torch.device = torch.device("cpu"),
    good_class: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """The run's best checkpoint on one subset of the run's own split."""
    run = RunDir.open(run_dir)
    split = Split.load(run.split_path)
    root = Path(data) if data is not None else Path(split.root)
    if not root.is_dir():
        raise DataError(f"data folder of this run not found: {root} (pass --data to point to it)")
    samples = split.subset(subset)
    if not samples:
        raise DataError(f"the '{subset}' split of {run.root} is empty")
    model = load_model(run.find_checkpoint("best"), device)
    if good_class is None:
        good_class = run.read_config().get("train", {}).get("good_class")
    m = evaluate_model(model, root, samples, split.classes, device, good_class=good_class,
                       batch_size=batch_size, progress=progress)
    m.update(split=subset, checkpoint=str(run.find_checkpoint("best")))
    write_json_atomic(run.eval_dir / f"{subset}.json", m)
    plot_confusion(m, run.eval_dir / f"confusion_{subset}.png")
    return m, run.eval_dir


def evaluate_folder(
    model: torch.nn.Module,
    data: str | Path,
    out: str | Path | None = None,
    device: torch.device = torch.device("cpu"),
    good_class: str | None = None,
    batch_size: int = 64,
    skip_bad: bool = False,
    progress: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Every image of an ImageFolder whose class folders are named after the model's classes
    (for ImageNet-1k models: the synset ids of the standard val layout)."""
    classes = model.vitfab_meta.classes
    index = scan_checked(data, skip_bad, progress, classes=classes)
    if not index.samples:
        raise DataError(f"no images of the model's classes in {data}")
    m = evaluate_model(model, data, index.samples, classes, device, good_class=good_class,
                       batch_size=batch_size, progress=progress)
    out = Path(out) if out is not None else Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    plot_confusion(m, out / "confusion.png")  # from the full matrix, before compacting
    m = _compact(m)
    m.update(data=str(Path(data).resolve()), model=model.vitfab_meta.name)
    write_json_atomic(out / "metrics.json", m)
    return m, out


def labelled_samples(
    model: torch.nn.Module,
    checkpoint: str | None,
    data: str | Path | None,
    progress: bool = True,
    subset: str = "val",
):
    """(root, samples, description) to check accuracy on, or None.

    ``data``: every image of a labelled folder whose classes are the model's; otherwise the
    ``subset`` (val by default) of a run folder's split.
    """
    if data is not None:
        index = scan_checked(data, progress=progress, classes=list(model.vitfab_meta.classes))
        if not index.samples:
            raise DataError(f"no images of the model's classes in {data}")
        return Path(data), index.samples, f"{data} ({len(index.samples)} images)"
    if checkpoint is not None and (Path(checkpoint) / "split.json").is_file():
        run = RunDir.open(checkpoint)
        split = Split.load(run.split_path)
        samples = split.subset(subset)
        if samples and Path(split.root).is_dir():
            return Path(split.root), samples, f"{subset} split of {run.root.name} ({len(samples)} images)"
    return None
