"""Top-1 of a model as it would run: prepared in a precision mode, with the non-finite guard."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import Precision, PrecisionError, check_finite, prepare_model
from .runner import collect_logits


def validation_accuracy(model: nn.Module, loader, device: torch.device, precision: Precision) -> float:
    """Top-1 of a prepared model over ``loader``; refuses (``PrecisionError``) non-finite logits."""
    logits, targets = collect_logits(model, loader, device, progress=False)
    check_finite(torch.from_numpy(logits), precision)
    return float((logits.argmax(1) == targets).mean()) if len(targets) else 0.0


def prepared_accuracy(model: nn.Module, precision: Precision, loader, device: torch.device):
    """(a copy of ``model`` prepared in ``precision``, its top-1 over ``loader``, None), or
    (None, None, the reason) where the mode cannot run here or gives non-finite logits."""
    try:
        m = prepare_model(model, precision, device)
        return m, validation_accuracy(m, loader, device, precision), None
    except PrecisionError as exc:
        return None, None, str(exc)
