"""The operating point of an inspection model: which images pass, which are flagged, and how sure
we are of the rates that follow.

A fab states its requirement as ceilings: at most ``max_escape`` of the defective images may
pass, at most ``max_overkill`` of the good images may be flagged, and at least ``min_recall[c]``
of defect class c's images must be flagged. The model's logits become one number per image,
``p_good`` (the summed softmax probability of the good classes after temperature scaling), and an
image passes where ``p_good >= threshold``. ``fit_operating_point`` fits the temperature (least
validation NLL, Guo et al. 2017) and then the threshold with the least overkill that meets the
escape ceiling and the recall floors (without an escape ceiling: the least escape within the
overkill ceiling and the floors).

The rest states the uncertainty of a rate measured on a finite set: exact one-sided Clopper-Pearson
upper bounds, the number of defective images a claim needs, a paired bootstrap interval of an
accuracy difference, and the expected calibration error with its reliability bins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import VitfabError
from .metrics import metric_value

CONFIDENCE = 0.95  # of every bound and interval stated
DEFAULT_MAX_OVERKILL = 10.0  # percent: so that "flag everything" never meets a requirement


def _fraction(value: float, what: str) -> float:
    """A percentage in [0, 100] as a fraction."""
    if not 0 <= value <= 100:
        raise VitfabError(f"{what} is a percentage in [0, 100], got {value:g}")
    return value / 100


def parse_min_recall(items: Sequence[str]) -> dict[str, float]:
    """``["void=0.99", "crack=95"]`` -> ``{"void": 0.99, "crack": 0.95}`` (a fraction, or percent above 1)."""
    out = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        try:
            r = float(value)
        except ValueError:
            r = -1.0
        if not sep or not name.strip() or not 0 <= r <= 100:
            raise VitfabError(f"--min-recall expects CLASS=R with R a fraction or a percentage, got '{item}'")
        out[name.strip()] = r / 100 if r > 1 else r
    return out


@dataclass(frozen=True)
class Ceilings:
    """The inspection requirement, as fractions: escape and overkill ceilings, per-class recall floors."""

    max_escape: float | None = None
    max_overkill: float = DEFAULT_MAX_OVERKILL / 100
    min_recall: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_percent(cls, max_escape: float | None, max_overkill: float | None,
                     min_recall: Sequence[str] = ()) -> "Ceilings":
        """From the command line's percentages (one clear error for a value outside [0, 100])."""
        return cls(None if max_escape is None else _fraction(max_escape, "--max-escape"),
                   _fraction(DEFAULT_MAX_OVERKILL if max_overkill is None else max_overkill, "--max-overkill"),
                   parse_min_recall(min_recall))

    @property
    def active(self) -> bool:
        """Whether a candidate can fail them (the overkill ceiling alone is met by passing everything)."""
        return self.max_escape is not None or bool(self.min_recall)

    def check(self, classes: Sequence[str], good: Sequence[int]) -> None:
        """Before any work: an escape ceiling needs a good class; a recall floor, a defect class."""
        if not good and (self.active or self.max_overkill < DEFAULT_MAX_OVERKILL / 100):
            raise VitfabError(f"--max-escape, --max-overkill and --min-recall need a good class (none of "
                              f"{', '.join(classes)} is named good/normal/ok): name the passable ones with "
                              f"--good-class")
        lowered = {c.lower(): i for i, c in enumerate(classes)}
        for name in self.min_recall:
            if name.lower() not in lowered:
                raise VitfabError(f"--min-recall {name}: no such class (classes: {', '.join(classes)})")
            if lowered[name.lower()] in good:
                raise VitfabError(f"--min-recall {name}: a good class passes; a recall floor is for a defect class")

    def describe(self) -> str:
        parts = [] if self.max_escape is None else [f"escape <= {100 * self.max_escape:g} %"]
        parts.append(f"overkill <= {100 * self.max_overkill:g} %")
        parts += [f"recall({c}) >= {100 * r:g} %" for c, r in self.min_recall.items()]
        return ", ".join(parts)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(targets)), np.asarray(targets)]
    return float(-np.mean(np.log(np.maximum(p, 1e-300))))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T with the least NLL of softmax(logits / T): golden-section search over
    1/T, in which the NLL is convex, within T in [0.05, 20]."""
    if not len(targets):
        return 1.0
    lo, hi = 1 / 20, 1 / 0.05
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, targets, 1 / a), nll(logits, targets, 1 / b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, targets, 1 / a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, targets, 1 / b)
    return float(2 / (lo + hi))


def p_good(logits: np.ndarray, temperature: float, good: Sequence[int]) -> np.ndarray:
    """Per image: the probability, after temperature scaling, that it belongs to a good class."""
    return softmax(logits, temperature)[:, list(good)].sum(axis=1)


def candidate_thresholds(p: np.ndarray) -> np.ndarray:
    """Every distinct pass set of ``p >= t``: 0 (all pass), the midpoints between neighbouring
    distinct values, and a value above the largest (all flagged)."""
    u = np.unique(p)
    top = np.nextafter(u[-1], np.inf) if u[-1] >= 1 else (u[-1] + 1) / 2
    return np.concatenate([[0.0], (u[:-1] + u[1:]) / 2, [top]]) if len(u) else np.array([0.0, 1.0])


def _passed_counts(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: how many ``values`` are >= t (pass)."""
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="left")


def rates_at(p: np.ndarray, targets: np.ndarray, good: Sequence[int], thresholds: np.ndarray,
             classes: Sequence[str]) -> dict[str, Any]:
    """Escape, overkill and each defect class's recall (flagged share) at every threshold; and
    the counts behind them."""
    targets = np.asarray(targets)
    is_good = np.isin(targets, list(good))
    n_def, n_good = int((~is_good).sum()), int(is_good.sum())
    escapes = _passed_counts(p[~is_good], thresholds)
    flagged_good = n_good - _passed_counts(p[is_good], thresholds)
    recall = {}
    for i, c in enumerate(classes):
        if i not in good and (targets == i).any():
            vals = p[targets == i]
            recall[c] = 1 - _passed_counts(vals, thresholds) / len(vals)
    return {"escape": escapes / max(n_def, 1), "overkill": flagged_good / max(n_good, 1), "recall": recall,
            "escapes": escapes, "flagged_good": flagged_good, "n_defective": n_def, "n_good": n_good}


@dataclass(frozen=True)
class OperatingPoint:
    """Where the model passes an image (``p_good >= threshold`` after temperature scaling), the
    ceilings it was fitted to and what it reached on the images it was fitted on."""

    good_classes: list[str]
    temperature: float
    threshold: float
    met: bool
    escape_rate: float
    overkill_rate: float
    recall: dict[str, float]
    ceilings: dict[str, Any]  # Ceilings as fractions
    fitted_on: str
    n_defective: int
    n_good: int
    shortfall: str | None = None  # which ceiling no threshold met, and by how much

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OperatingPoint":
        return cls(**d)

    def good_indices(self, classes: Sequence[str]) -> list[int]:
        return [list(classes).index(c) for c in self.good_classes]

    def decide(self, logits: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(p_good, passed) of each image."""
        pg = p_good(logits, self.temperature, self.good_indices(classes))
        return pg, pg >= self.threshold


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def fit_threshold(p: np.ndarray, targets: np.ndarray, classes: Sequence[str], good: Sequence[int],
                  ceilings: Ceilings, fitted_on: str = "validation") -> dict[str, Any]:
    """The threshold on ``p`` (pass where ``p >= threshold``): the least overkill that meets the
    escape ceiling and the recall floors, or without an escape ceiling the least escape within the
    overkill ceiling and the floors. Where no threshold meets them all, the one that meets the
    escape ceiling and the floors, ``met`` False and ``shortfall`` saying by how much."""
    th = candidate_thresholds(p)
    r = rates_at(p, targets, good, th, classes)
    floors = np.ones(len(th), dtype=bool)
    by_name = {k.lower(): v for k, v in r["recall"].items()}
    for c, need in ceilings.min_recall.items():
        if c.lower() in by_name:  # a floor's class without images here constrains nothing
            floors &= by_name[c.lower()] >= need - 1e-12
    within_overkill = r["overkill"] <= ceilings.max_overkill + 1e-12
    if ceilings.max_escape is not None:
        safe = floors & (r["escape"] <= ceilings.max_escape + 1e-12)
        i = int(np.argmax(safe))  # the lowest threshold (least overkill) that is safe; flag-all always is
        met = bool(within_overkill[i])
    else:
        ok = floors & within_overkill
        met = bool(ok.any())
        i = int(len(th) - 1 - np.argmax(ok[::-1])) if met else int(np.argmax(floors))  # least escape
    shortfall = None
    if not met:
        dual = within_overkill & floors
        least = f"; within it the least escape is {_pct(r['escape'][dual].min())}" if dual.any() else ""
        what = "the recall floors" if ceilings.max_escape is None else f"escape <= {_pct(ceilings.max_escape)}" + (
            " and the recall floors" if ceilings.min_recall else "")
        shortfall = (f"{what} needs {_pct(r['overkill'][i])} overkill on {fitted_on} (ceiling "
                     f"{_pct(ceilings.max_overkill)}, missed by {100 * (r['overkill'][i] - ceilings.max_overkill):.2f} "
                     f"points){least}")
    return {"threshold": float(th[i]), "met": met, "escape_rate": float(r["escape"][i]),
            "overkill_rate": float(r["overkill"][i]), "recall": {c: float(v[i]) for c, v in r["recall"].items()},
            "n_defective": r["n_defective"], "n_good": r["n_good"], "shortfall": shortfall}


def fit_operating_point(logits: np.ndarray, targets: np.ndarray, classes: Sequence[str], good: Sequence[int],
                        ceilings: Ceilings, fitted_on: str = "validation") -> OperatingPoint:
    """The temperature (least NLL), then the threshold on p_good (``fit_threshold``)."""
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets)
    is_good = np.isin(targets, list(good))
    if not is_good.any() or is_good.all():
        raise VitfabError(f"an operating point needs good and defective images on {fitted_on}: got "
                          f"{int(is_good.sum())} good, {int((~is_good).sum())} defective")
    t = fit_temperature(logits, targets)
    f = fit_threshold(p_good(logits, t, good), targets, classes, good, ceilings, fitted_on)
    return OperatingPoint([classes[g] for g in good], round(t, 6), f["threshold"], f["met"], f["escape_rate"],
                          f["overkill_rate"], f["recall"], asdict(ceilings), fitted_on, f["n_defective"], f["n_good"],
                          f["shortfall"])


# --------------------------------------------------------------------------- uncertainty
def _log_binom_cdf(k: int, n: int, p: float) -> float:
    """log P(X <= k) for X ~ Binomial(n, p), 0 < p < 1, summed exactly in log space."""
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k + 1)]
    m = max(terms)
    return m + math.log(sum(math.exp(x - m) for x in terms))


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float | None:
    """The exact one-sided upper bound of a rate seen k times in n: the p at which
    P(X <= k) = 1 - confidence (bisection); None without images, 1 where k = n."""
    if n <= 0:
        return None
    if k >= n:
        return 1.0
    target = math.log(1 - confidence)
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid <= 0 or _log_binom_cdf(k, n, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def images_needed(rate: float, confidence: float = CONFIDENCE) -> int | None:
    """Defective images that, with no escape among them, bound the escape rate at ``rate``."""
    if rate <= 0:
        return None  # a zero rate is never shown by a finite sample
    if rate >= 1:
        return 0
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate))


def paired_bootstrap(targets: np.ndarray, preds_a: np.ndarray, preds_b: np.ndarray, num_classes: int, metric: str,
                     n_boot: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, float]:
    """metric(a) - metric(b) on the same images, and its percentile interval over ``n_boot``
    resamples of the images (the same indices for both models)."""
    targets, preds_a, preds_b = (np.asarray(x, dtype=np.int64) for x in (targets, preds_a, preds_b))
    diff = metric_value(metric, targets, preds_a, num_classes) - metric_value(metric, targets, preds_b, num_classes)
    rng = np.random.default_rng(seed)
    n = len(targets)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, n, n)
        boots[b] = (metric_value(metric, targets[i], preds_a[i], num_classes)
                    - metric_value(metric, targets[i], preds_b[i], num_classes))
    alpha = (1 - confidence) / 2
    return {"difference": float(diff), "low": float(np.quantile(boots, alpha)),
            "high": float(np.quantile(boots, 1 - alpha)), "resamples": n_boot}


def within_verdict(interval: dict[str, float], points: float = 1.0) -> str:
    """Whether a's metric is within ``points`` of b's, judged against the bootstrap interval."""
    margin = points / 100
    if interval["low"] >= -margin:
        return f"within {points:g} point: shown (the whole interval is above -{points:g})"
    if interval["high"] < -margin:
        return f"not within {points:g} point (the whole interval is below -{points:g})"
    return f"undecided at this test size (the interval spans -{points:g})"


def calibration(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error (top-1 confidence against accuracy, equal-width bins) and the
    reliability diagram's bins (mean confidence, accuracy, count)."""
    prob = softmax(logits, temperature)
    conf, correct = prob.max(axis=1), prob.argmax(axis=1) == np.asarray(targets)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            rows.append({"confidence": float(conf[sel].mean()), "accuracy": float(correct[sel].mean()),
                         "count": int(sel.sum())})
            ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return {"ece": float(ece), "bins": rows, "temperature": temperature}


def rates_with_bounds(passed: np.ndarray, targets: np.ndarray, good: Sequence[int]) -> dict[str, Any]:
    """Escape and overkill of a pass/flag decision with their counts and upper bounds."""
    is_good = np.isin(np.asarray(targets), list(good))
    k_e, n_d = int((passed & ~is_good).sum()), int((~is_good).sum())
    k_o, n_g = int((~passed & is_good).sum()), int(is_good.sum())
    return {"escape_rate": k_e / n_d if n_d else None, "escapes": k_e, "n_defective": n_d,
            "escape_upper": clopper_pearson_upper(k_e, n_d),
            "overkill_rate": k_o / n_g if n_g else None, "flagged_good": k_o, "n_good": n_g,
            "overkill_upper": clopper_pearson_upper(k_o, n_g)}


def operating_metrics(op: OperatingPoint, logits: np.ndarray, targets: np.ndarray,
                      classes: Sequence[str]) -> dict[str, Any]:
    """What a recorded operating point gives on labelled images: rates, counts, bounds."""
    _, passed = op.decide(logits, classes)
    return {"threshold": op.threshold, "temperature": op.temperature, "good_classes": op.good_classes,
            **rates_with_bounds(passed, targets, op.good_indices(classes))}


def curve(p: np.ndarray, targets: np.ndarray, good: Sequence[int], points: int = 200) -> dict[str, list[float]]:
    """The escape-vs-overkill curve of a threshold sweep (at most ``points`` thresholds kept)."""
    th = candidate_thresholds(p)
    if len(th) > points:
        th = th[np.unique(np.linspace(0, len(th) - 1, points).round().astype(int))]
    r = rates_at(p, targets, good, th, [])
    return {"threshold": th.tolist(), "escape": r["escape"].tolist(), "overkill": r["overkill"].tolist()}


__all__ = ["CONFIDENCE", "Ceilings", "DEFAULT_MAX_OVERKILL", "OperatingPoint", "calibration", "candidate_thresholds",
           "clopper_pearson_upper", "curve", "fit_operating_point", "fit_temperature", "fit_threshold", "images_needed",
           "operating_metrics", "p_good", "paired_bootstrap", "parse_min_recall", "rates_at", "rates_with_bounds",
           "softmax", "within_verdict"]
