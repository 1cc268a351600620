"""Evaluation: top-1/top-5, macro-F1, per-class precision/recall, escape and overkill rates."""

from .metrics import classification_metrics, find_good_class, format_metrics
from .runner import collect_logits, evaluate_model, plot_confusion

__all__ = [
    "classification_metrics",
    "collect_logits",
    "evaluate_model",
    "find_good_class",
    "format_metrics",
    "plot_confusion",
]
