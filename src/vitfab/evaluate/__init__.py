"""Evaluation: top-1/top-5, macro-F1, per-class precision/recall, escape and overkill rates;
running models over images (accuracy as deployed, predictions to CSV)."""

from .accuracy import prepared_accuracy, validation_accuracy
from .metrics import classification_metrics, good_classes, format_metrics
from .runner import CachedBatches, collect_logits, evaluate_model, make_eval_loader, plot_confusion

__all__ = [
    "CachedBatches",
    "classification_metrics",
    "collect_logits",
    "evaluate_model",
    "good_classes",
    "format_metrics",
    "make_eval_loader",
    "plot_confusion",
    "prepared_accuracy",
    "validation_accuracy",
]
