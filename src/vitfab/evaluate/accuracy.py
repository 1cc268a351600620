"""Accuracy metrics of a model as it would run: prepared in a precision mode, with the
non-finite guard."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..precision import Precision, PrecisionError, check_finite, prepare_model
from .metrics import METRICS, metric_value
from .runner import collect_logits

METRIC_NAMES = {"top1": "top-1", "macro_f1": "macro-F1", "balanced_accuracy": "balanced accuracy"}


def scores_of(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Every one of ``METRICS`` from logits and targets."""
    preds = logits.argmax(1) if len(targets) else np.zeros(0, dtype=np.int64)
    n = logits.shape[1] if logits.ndim == 2 else 0
    return {m: metric_value(m, targets, preds, n) for m in METRICS}


def validation_outputs(model: nn.Module, loader, device: torch.device,
                       precision: Precision) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) of a prepared model over ``loader``; refuses (``PrecisionError``)
    non-finite logits."""
    logits, targets = collect_logits(model, loader, device, progress=False)
    check_finite(torch.from_numpy(logits), precision)
    return logits, targets


def validation_scores(model: nn.Module, loader, device: torch.device, precision: Precision) -> dict[str, float]:
    """Every one of ``METRICS`` of a prepared model over ``loader`` (see ``validation_outputs``)."""
    return scores_of(*validation_outputs(model, loader, device, precision))


def validation_accuracy(model: nn.Module, loader, device: torch.device, precision: Precision) -> float:
    """Top-1 of a prepared model over ``loader`` (see ``validation_scores``)."""
    return validation_scores(model, loader, device, precision)["top1"]


def prepared_outputs(model: nn.Module, precision: Precision, loader, device: torch.device):
    """(a copy of ``model`` prepared in ``precision``, (logits, targets) over ``loader``, None), or
    (None, None, the reason) where the mode cannot run here or gives non-finite logits."""
    try:
        m = prepare_model(model, precision, device)
        return m, validation_outputs(m, loader, device, precision), None
    except PrecisionError as exc:
        return None, None, str(exc)


def prepared_accuracy(model: nn.Module, precision: Precision, loader, device: torch.device):
    """As ``prepared_outputs``, with top-1 alone."""
    m, out, err = prepared_outputs(model, precision, loader, device)
    return m, (None if out is None else scores_of(*out)["top1"]), err


__all__ = ["METRIC_NAMES", "prepared_accuracy", "prepared_outputs", "scores_of", "validation_accuracy",
           "validation_outputs", "validation_scores"]
