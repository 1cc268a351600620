"""The bit-width axis: fp32 / fp16 / bf16 / int8 execution, and the rule of ``auto``."""

from .auto import DEFAULT_TOLERANCE, PrecisionChoice, PrecisionTrial, accuracy_table, choose_precision
from .cast import check_finite, prepare_model, quantize_linear_int8
from .modes import (
    AUTO,
    PRECISION_CHOICES,
    Precision,
    PrecisionError,
    candidate_precisions,
    parse_precision,
    unsupported_reason,
    useful_precisions,
    with_reference,
)

__all__ = [
    "AUTO", "DEFAULT_TOLERANCE", "PRECISION_CHOICES", "Precision", "PrecisionChoice", "PrecisionError",
    "PrecisionTrial", "accuracy_table", "candidate_precisions", "check_finite", "choose_precision",
    "parse_precision", "prepare_model", "quantize_linear_int8", "unsupported_reason", "useful_precisions", "with_reference",
]
