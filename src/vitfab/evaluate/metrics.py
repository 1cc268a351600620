"""Classification metrics from logits, including the inspection-line ones.

The good classes (``--good-class``, a comma list; default a class named good / normal / ok) are
the ones whose images may pass; every other class is a defect. At the argmax class:

- **escape rate**: defective images classified as a good class / defective images
  (a defect that leaves the line);
- **overkill rate**: good images classified as any defect / good images (a good part scrapped
  or sent to re-inspection).

At a calibrated reject threshold (an operating point) they are ``evaluate.operating``'s.
The accuracy metrics a requirement may be stated in (``METRICS``): top-1, macro-F1 (mean F1 over
the classes present) and balanced accuracy (mean recall over the classes present).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import VitfabError

GOOD_CLASS_NAMES = ("good", "normal", "ok")
METRICS = ("top1", "macro_f1", "balanced_accuracy")  # what a requirement and every selection may compare


def good_classes(classes: Sequence[str], good_class: str | None = None) -> list[int]:
    """Indices of the classes whose images may pass: ``good_class`` (a comma list of class names,
    any case) if given, else the first class named good / normal / ok; empty where there is none."""
    lowered = [c.lower() for c in classes]
    if good_class is not None:
        names = [n.strip() for n in good_class.split(",") if n.strip()]
        unknown = [n for n in names if n.lower() not in lowered]
        if unknown or not names:
            raise VitfabError(f"--good-class '{good_class}': {', '.join(unknown) or 'no class'} is not one of the "
                              f"classes: {', '.join(classes)}")
        idx = list(dict.fromkeys(lowered.index(n.lower()) for n in names))
        if len(idx) == len(classes):
            raise VitfabError(f"--good-class '{good_class}' names every class: no image could be a defect")
        return idx
    return next(([lowered.index(n)] for n in GOOD_CLASS_NAMES if n in lowered), [])


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


def metric_value(metric: str, targets: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """One of ``METRICS`` from the argmax predictions."""
    targets, preds = np.asarray(targets, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if not len(targets):
        return 0.0
    if metric == "top1":
        return float(np.mean(preds == targets))
    _, recall, f1, support = _per_class(confusion_matrix(targets, preds, num_classes))
    if metric == "macro_f1":
        return _macro(f1, support)
    if metric == "balanced_accuracy":
        return _macro(recall, support)
    raise VitfabError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")


def argmax_rates(targets: np.ndarray, preds: np.ndarray, good: Sequence[int]) -> dict[str, float | None]:
    """Escape and overkill rates where an image passes when its argmax class is a good one."""
    targets, preds = np.asarray(targets), np.asarray(preds)
    is_good, passed = np.isin(targets, list(good)), np.isin(preds, list(good))
    return {"escape_rate": float(np.mean(passed[~is_good])) if (~is_good).any() else None,
            "overkill_rate": float(np.mean(~passed[is_good])) if is_good.any() else None}


def classification_metrics(
    logits: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    good_class: str | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (more than five classes), macro-F1, balanced accuracy, per-class
    precision/recall/F1, confusion matrix, and escape/overkill rates at the argmax class when a
    good class exists."""
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
        "balanced_accuracy": _macro(recall, support),
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
    good = good_classes(classes, good_class)
    if good:
        out["good_class"] = ",".join(classes[g] for g in good)
        out |= argmax_rates(targets, preds, good)
    return out


def format_metrics(m: dict[str, Any]) -> str:
    """One line per headline metric, for the terminal."""

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = [f"images      {m['n']}", f"top-1       {pct(m['top1'])}"]
    if "top5" in m:
        lines.append(f"top-5       {pct(m['top5'])}")
    lines.append(f"macro-F1    {m['macro_f1']:.4f}")
    if "balanced_accuracy" in m:
        lines.append(f"balanced    {pct(m['balanced_accuracy'])}")
    if "good_class" in m:
        lines.append(f"escape rate {pct(m['escape_rate'])}  (defects called '{m['good_class']}', at the argmax)")
        lines.append(f"overkill    {pct(m['overkill_rate'])}  ('{m['good_class']}' called defective, at the argmax)")
    op = m.get("operating_point")
    if op:
        lines.append(f"at the operating point (p_good >= {op['threshold']:.4f}, T = {op['temperature']:.3f}): escape "
                     f"{pct(op['escape_rate'])} (95 % upper bound {pct(op['escape_upper'])}), overkill "
                     f"{pct(op['overkill_rate'])} (upper bound {pct(op['overkill_upper'])})")
    return "\n".join(lines)
