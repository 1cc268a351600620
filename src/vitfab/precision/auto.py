"""``auto``: the rule that picks a mode from measured trials, the fastest that stays accurate.

Nothing is assumed about the hardware: on a CPU without fast fp16 the fp16 trial is simply
slow, and on one with native bf16 the bf16 trial is simply fast. A mode is accepted when its
logits are finite and its validation top-1 is within ``tolerance`` of fp32's. Measuring the
trials is ``measure.select_precision``'s job; this module only decides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .modes import Precision, PrecisionError

DEFAULT_TOLERANCE = 0.01  # top-1, absolute (one point)


@dataclass
class PrecisionTrial:
    precision: str
    accuracy: float | None = None
    img_per_s: float | None = None
    error: str | None = None  # could not run: unsupported here, or non-finite logits
    accepted: bool = False
    reason: str = ""  # the verdict, set by choose_precision


@dataclass
class PrecisionChoice:
    precision: Precision
    device: str
    tolerance: float
    reference_accuracy: float
    trials: list[PrecisionTrial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision.value, "device": self.device, "tolerance": self.tolerance,
                "reference_accuracy": self.reference_accuracy, "trials": [asdict(t) for t in self.trials]}


def choose_precision(
    trials: Sequence[PrecisionTrial], tolerance: float = DEFAULT_TOLERANCE, device: str = ""
) -> PrecisionChoice:
    """The rule: fastest trial whose accuracy is within ``tolerance`` of the fp32 trial.

    Trials with an ``error`` (unsupported, non-finite logits) are rejected with it. fp32 is the
    reference and always acceptable. The given trials are not modified.
    """
    trials = [dataclasses.replace(t, accepted=False, reason="") for t in trials]
    ref = next((t for t in trials if t.precision == Precision.FP32.value), None)
    if ref is None or ref.accuracy is None or ref.error:
        raise PrecisionError("precision selection needs a working fp32 trial as the reference")
    for t in trials:
        if t.error:
            t.reason = t.error
        elif t.accuracy is None or t.img_per_s is None:
            t.reason = "not measured"
        elif t.accuracy < ref.accuracy - tolerance - 1e-12:
            t.reason = f"top-1 {100 * t.accuracy:.2f}% is more than {100 * tolerance:.2f} points below fp32"
        else:
            t.accepted = True
    best = max((t for t in trials if t.accepted), key=lambda t: t.img_per_s)
    for t in trials:
        if t.accepted and t is not best:
            t.reason = f"slower than {best.precision}"
    best.reason = "chosen: fastest within tolerance"
    return PrecisionChoice(Precision(best.precision), device, tolerance, ref.accuracy, trials)


def accuracy_table(choice: PrecisionChoice) -> list[dict[str, Any]]:
    """Rows for display: mode, top-1, change vs fp32 (points), img/s, speed vs fp32, verdict."""
    ref = next(t for t in choice.trials if t.precision == "fp32")
    rows = []
    for t in choice.trials:
        rows.append({
            "precision": t.precision,
            "accuracy": t.accuracy,
            "delta_points": None if t.accuracy is None else 100 * (t.accuracy - ref.accuracy),
            "img_per_s": t.img_per_s,
            "speedup": None if not t.img_per_s else t.img_per_s / ref.img_per_s,
            "accepted": t.accepted,
            "reason": t.reason,
        })
    return rows


__all__ = ["DEFAULT_TOLERANCE", "PrecisionChoice", "PrecisionTrial", "accuracy_table", "choose_precision"]
