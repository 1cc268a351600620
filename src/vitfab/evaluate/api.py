"""Evaluation entry points behind ``vitfab eval``: a run's split, or any labelled folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.images import MAX_IMAGE_PIXELS, max_pixels_option, scan_checked, skip_bad_option
from ..data.split import Split
from ..errors import DataError, VitfabError
from ..files import write_json_atomic
from ..models import create_model
from ..options import option, parse_key_values
from ..rundir import RunDir
from ..runtime import resolve_device
from ..runtimes import load_model
from .runner import evaluate_model, plot_confusion

MAX_CLASSES_IN_FULL = 50  # beyond this (ImageNet), only classes that occur are listed


@dataclass
class EvalConfig:
    """``vitfab eval``: a run on its own split, or a checkpoint / timm model on a labelled folder."""

    run: str | None = option(None, help="A run folder: its best checkpoint on its own split.")
    checkpoint: str | None = option(None, help="A vitfab checkpoint (folder or .safetensors).")
    model: str | None = option(None, help="A timm model name (with --pretrained or --weights).")
    pretrained: bool = option(False, help="With --model: timm's hub weights.")
    weights: str | None = option(None, help="With --model: a local weights file.")
    img_size: int | None = option(None, help="With --model: input size override.")
    patch_size: int | None = option(None, help="With --model: patch size override.")
    model_args: dict[str, Any] = option(default_factory=dict, flag="model-arg", cli_type=list[str], cli_default=[],
                                        parse=parse_key_values, help="With --model: extra timm argument KEY=VALUE; "
                                                                     "repeatable.")
    data: str | None = option(None, help="Labelled folder (for --run: where the run's data now lives).")
    split: str = option("test", help="With --run: train, val, test or all.")
    good_class: str | None = option(None, help="Class meaning 'no defect' (default: good/normal/ok).")
    out: str | None = option(None, help="Folder for metrics.json and confusion.png.")
    batch_size: int = option(64, help="Images per forward pass.")
    skip_bad_images: bool = skip_bad_option()
    max_image_pixels: int = max_pixels_option()
    device: str = option("auto", help="auto, cpu or cuda.")

    def evaluate(self, progress: bool = True) -> tuple[dict[str, Any], Path]:
        """(metrics, the folder they were written to)."""
        dev = resolve_device(self.device)
        if len([x for x in (self.run, self.checkpoint, self.model) if x is not None]) != 1:
            raise VitfabError("give exactly one of --run RUN_DIR, --checkpoint PATH, --model NAME")
        if self.run is not None:
            return evaluate_run(self.run, self.split, self.data, dev, self.good_class, self.batch_size, progress)
        if self.data is None:
            raise VitfabError("--data DIR is required with --checkpoint or --model")
        if self.checkpoint is not None:
            net = load_model(self.checkpoint, dev)
        else:
            if not (self.pretrained or self.weights):
                raise VitfabError("--model needs --pretrained or --weights PATH (an untrained model is noise)")
            net = create_model(self.model, img_size=self.img_size, patch_size=self.patch_size,
                               pretrained=self.pretrained, weights=self.weights, **self.model_args).to(dev).eval()
        return evaluate_folder(net, self.data, self.out, dev, self.good_class, self.batch_size,
                               self.skip_bad_images, progress, self.max_image_pixels)


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
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[dict[str, Any], Path]:
    """Every image of an ImageFolder whose class folders are named after the model's classes
    (for ImageNet-1k models: the synset ids of the standard val layout)."""
    classes = model.vitfab_meta.classes
    index = scan_checked(data, skip_bad, progress, classes=classes, max_pixels=max_pixels)
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
    max_pixels: int | None = MAX_IMAGE_PIXELS,
):
    """(root, samples, description) to check accuracy on, or None.

    ``data``: every image of a labelled folder whose classes are the model's; otherwise the
    ``subset`` (val by default) of a run folder's split.
    """
    if data is not None:
        index = scan_checked(data, progress=progress, classes=list(model.vitfab_meta.classes), max_pixels=max_pixels)
        if not index.samples:
            raise DataError(f"no images of the model's classes in {data}")
        return Path(data), index.samples, f"{data} ({len(index.samples)} images)"
    if checkpoint is not None and RunDir(checkpoint).split_path.is_file():
        run = RunDir.open(checkpoint)
        split = Split.load(run.split_path)
        samples = split.subset(subset)
        if samples and Path(split.root).is_dir():
            return Path(split.root), samples, f"{subset} split of {run.root.name} ({len(samples)} images)"
    return None
