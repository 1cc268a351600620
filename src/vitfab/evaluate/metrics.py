"""Classification metrics from logits, including the inspection-line ones.

- **escape rate**: defective images classified as the good class / defective images
  (a defect that leaves the line);
- **overkill rate**: good images classified as any defect / good images (a good part scrapped
  or sent to re-inspection).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import VitfabError

GOOD_CLASS_NAMES = ("good", "normal", "ok")


def find_good_class(classes: Sequence[str], good_class: str | None = None) -> int | None:
    """Index of the class that means 'no defect': ``good_class`` if given, else one named
    good / normal / ok (any case), else ``None``."""
    lowered = [c.lower() for c in classes]
    if good_class is not None:
        if good_class.lower() not in lowered:
            raise VitfabError(f"--good-class '{good_class}' is not one of the classes: {', '.join(classes)}")
        return lowered.index(good_class.lower())
    for name in GOOD_CLASS_NAMES:
        if name in lowered:
            return lowered.index(name)
    return None


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = images of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(topk == targets[:, None], axis=1)))


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1, support) per class of a confusion matrix (rows: true class)."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1).astype(np.float64), cm.sum(axis=0).astype(np.float64)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    return precision, recall, _safe_div(2 * precision * recall, precision + recall), support


def _macro(f1: np.ndarray, support: np.ndarray) -> float:
    present = support > 0  # macro-F1 over the classes that occur in the evaluated set
    return float(f1[present].mean()) if present.any() else 0.0


def macro_f1(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean F1 over the classes that occur in ``targets``."""
    cm = confusion_matrix(np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64), num_classes)
    _, _, f1, support = _per_class(cm)
    return _macro(f1, support)


def classification_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    good_class: str | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (more than five classes), macro-F1, per-class precision/recall/F1,
    confusion matrix, and escape/overkill rates when a good class exists."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    n_cls = len(classes)
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(targets, preds, n_cls)
    precision, recall, f1, support = _per_class(cm)
    out: dict[str, Any] = {
        "n": int(len(targets)),
        "top1": float(np.mean(preds == targets)) if len(targets) else 0.0,
        "macro_f1": _macro(f1, support),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }
    if n_cls > 5:
        out["top5"] = topk_accuracy(logits, targets, 5)
    g = find_good_class(classes, good_class)
    if g is not None:
        good = targets == g
        defective = ~good
        out["good_class"] = classes[g]
        out["escape_rate"] = float(np.mean(preds[defective] == g)) if defective.any() else None
        out["overkill_rate"] = float(np.mean(preds[good] != g)) if good.any() else None
    return out


def format_metrics(m: dict[str, Any]) -> str:
    """One line per headline metric, for the terminal."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [f"images      {m['n']}", f"top-1       {pct(m['top1'])}"]
    if "top5" in m:
        lines.append(f"top-5       {pct(m['top5'])}")
    lines.append(f"macro-F1    {m['macro_f1']:.4f}")
    if "good_class" in m:
        lines.append(f"escape rate {pct(m['escape_rate'])}  (defects called '{m['good_class']}')")
        lines.append(f"overkill    {pct(m['overkill_rate'])}  ('{m['good_class']}' called defective)")
    return "\n".join(lines)
