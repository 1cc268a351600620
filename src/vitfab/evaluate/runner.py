"""Running a model over a dataset: logits, metrics, the confusion-matrix plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.dataset import ImageListDataset
from ..data.transforms import Preprocess, eval_transform
from ..progress import task
from ..runtime import autocast, default_workers
from .metrics import classification_metrics
from .operating import OperatingPoint, operating_metrics


class CachedBatches:
    """A loader read once into memory, for running many models over the same images."""

    def __init__(self, loader: DataLoader):
        self.batches = [(x, y) for x, y in loader]
        self.dataset = range(sum(len(y) for _, y in self.batches))  # sized, like a loader's dataset

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.batches[0][0].shape[-2:])


def evenly_spaced(samples: Sequence[tuple[str, int]], count: int) -> list[tuple[str, int]]:
    """``count`` of ``samples``, evenly spaced through the list, so every class of a sorted split is drawn."""
    step = max(len(samples) / max(count, 1), 1.0)
    return [samples[int(i * step)] for i in range(min(count, len(samples)))]


def image_batches(root: str | Path, samples: Sequence[tuple[str, int]], pre: Preprocess, count: int,
                  batch_size: int = 16) -> list[np.ndarray]:
    """``count`` of ``samples`` (``evenly_spaced``) read as fp32 image batches: a runtime's
    calibration set, or a held-back check batch."""
    loader = make_eval_loader(root, evenly_spaced(samples, count), pre, batch_size, workers=0)
    return [x.numpy() for x, _ in loader]


@torch.inference_mode()
def collect_logits(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "off",
    progress: bool = True,
    description: str = "eval",
    parent=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets over a loader (``model`` is put in eval mode); ``parent``: a live rich
    Progress to draw in."""
    model.eval()
    all_logits, all_targets = [], []
    with task(description, total=len(loader.dataset), enabled=progress, parent=parent) as advance:
        for x, y in loader:
            with autocast(device, amp):
                out = model(x.to(device, non_blocking=True))
            all_logits.append(out.float().cpu().numpy())
            all_targets.append(np.asarray(y))
            advance(len(y))
    if not all_logits:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64)
    return np.concatenate(all_logits), np.concatenate(all_targets)


def make_eval_loader(
    root: str | Path,
    samples: Sequence[tuple[str, int]],
    pre: Preprocess,
    batch_size: int = 64,
    workers: int | None = None,
) -> DataLoader:
    ds = ImageListDataset(root, samples, eval_transform(pre))
    workers = default_workers() if workers is None else workers
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


def evaluate_model(
    model: torch.nn.Module,
    root: str | Path,
    samples: Sequence[tuple[str, int]],
    classes: Sequence[str],
    device: torch.device,
    pre: Preprocess | None = None,
    class_map: Sequence[int] | None = None,
    good_class: str | None = None,
    batch_size: int = 64,
    amp: str = "off",
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``samples``; where an operating point is recorded with the model,
    also its escape and overkill there (``operating_point``: rates, counts, 95 % upper bounds).

    ``class_map[j]`` is the model output index of dataset class ``j`` (identity by default);
    metrics are over the model's classes ``classes``.
    """
    pre = pre or model.vitfab_meta.preprocess
    if class_map is not None:
        samples = [(p, int(class_map[y])) for p, y in samples]
    loader = make_eval_loader(root, samples, pre, batch_size)
    logits, targets = collect_logits(model, loader, device, amp, progress)
    m = classification_metrics(logits, targets, classes, good_class)
    recorded = getattr(model, "vitfab_meta", None) and model.vitfab_meta.extra.get("operating_point")
    if recorded:
        m["operating_point"] = operating_metrics(OperatingPoint.from_dict(recorded), logits, targets, classes)
    return m


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Confusion matrix as a PNG: counts, rows normalised for the colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    present = cm.sum(axis=1) > 0
    if len(classes) > 30:  # ImageNet-sized: show only the classes that occur
        idx = np.where(present | (cm.sum(axis=0) > 0))[0]
        cm, classes = cm[np.ix_(idx, idx)], [classes[i] for i in idx]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or f"top-1 {100 * metrics['top1']:.1f}%  macro-F1 {metrics['macro_f1']:.3f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
