"""Top-1 and macro-F1 of a model as it would run: prepared in a precision mode, with the
non-finite guard."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import Precision, PrecisionError, check_finite, prepare_model
from .metrics import macro_f1
from .runner import collect_logits

METRIC_NAMES = {"top1": "top-1", "macro_f1": "macro-F1"}


def validation_scores(model: nn.Module, loader, device: torch.device, precision: Precision) -> dict[str, float]:
    """{"top1", "macro_f1"} of a prepared model over ``loader``; refuses (``PrecisionError``)
    non-finite logits."""
    logits, targets = collect_logits(model, loader, device, progress=False)
    check_finite(torch.from_numpy(logits), precision)
    if not len(targets):
        return {"top1": 0.0, "macro_f1": 0.0}
    preds = logits.argmax(1)
    return {"top1": float((preds == targets).mean()), "macro_f1": macro_f1(targets, preds, logits.shape[1])}


def validation_accuracy(model: nn.Module, loader, device: torch.device, precision: Precision) -> float:
    """Top-1 of a prepared model over ``loader`` (see ``validation_scores``)."""
    return validation_scores(model, loader, device, precision)["top1"]


def prepared_scores(model: nn.Module, precision: Precision, loader, device: torch.device):
    """(a copy of ``model`` prepared in ``precision``, its scores over ``loader``, None), or
    (None, None, the reason) where the mode cannot run here or gives non-finite logits."""
    try:
        m = prepare_model(model, precision, device)
        return m, validation_scores(m, loader, device, precision), None
    except PrecisionError as exc:
        return None, None, str(exc)


def prepared_accuracy(model: nn.Module, precision: Precision, loader, device: torch.device):
    """As ``prepared_scores``, with top-1 alone."""
    m, scores, err = prepared_scores(model, precision, loader, device)
    return m, (None if scores is None else scores["top1"]), err


__all__ = ["METRIC_NAMES", "prepared_accuracy", "prepared_scores", "validation_accuracy", "validation_scores"]
