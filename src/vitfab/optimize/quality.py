"""The main job's quality stage: the requirement as a quality engineer states it, and how sure the
test split lets anyone be of it.

For the chosen model (as delivered: ToMe schedule and precision), the DeiT-B/16 baseline and the
best reference: the operating point (the chosen model's recorded one; the others fitted to the
same ceilings on validation), its escape and overkill on test with exact 95 % upper bounds, and
the test split's escape-vs-overkill curve. For the chosen model: calibration (ECE and reliability
bins) before and after temperature scaling; against the best reference: a paired bootstrap 95 %
interval of the test difference in the run's metric, and "within 1 point" judged against it.
"""

from __future__ import annotations

from ..evaluate.metrics import metric_value
from ..evaluate.operating import (OperatingPoint, calibration, curve, fit_temperature, images_needed,
                                  operating_metrics, p_good, paired_bootstrap, within_verdict)
from ..evaluate.runner import collect_logits
from ..options import RECORDED
from ..progress import console
from ..report.quality import calibration_line, comparison_line, operating_line
from ..report.summary import OperatingRow, QualityInfo
from ..runtimes import load_model
from .context import JobContext
from .results import BaselineResult, DataResult, FinalResult, ReferencesResult

MARGIN_POINTS = 1.0  # "within 1 point" of the best reference


def _outputs(ctx: JobContext, split, model, label: str):
    """(val logits, test logits, val targets, test targets) of a prepared model."""
    pre = model.vitfab_meta.preprocess
    out = []
    for subset in ("val", "test"):
        out.append(collect_logits(model, ctx.loader(split, subset, pre), ctx.device, progress=False,
                                  description=f"{label} ({subset})"))
    (lv, tv), (lt, tt) = out
    return lv, lt, tv, tt


def stage_quality(ctx: JobContext, data: DataResult, baseline: BaselineResult, references: ReferencesResult,
                  final: FinalResult) -> QualityInfo:
    c, split, metric = ctx.config, data.load_split(), data.metric
    classes, good = data.classes, [data.classes.index(g) for g in data.good_classes]
    fit = data.operating_fitter(c.ceilings())
    best = references.model(references.best) if references.best else None
    models = [("chosen", "chosen", final.checkpoint), ("DeiT-B/16 baseline", "baseline", baseline.checkpoint)]
    models += [(best.label, "reference", best.checkpoint)] if best else []
    rows, preds, chosen_out = [], {}, None
    for label, kind, path in models:
        model = load_model(path, ctx.device, RECORDED if kind == "chosen" else None)
        lv, lt, tv, tt = _outputs(ctx, split, model, label)
        preds[kind] = lt.argmax(1)
        op = None
        if fit is not None:
            op = OperatingPoint.from_dict(final.operating) if kind == "chosen" and final.operating else fit(lv, tv)
        if kind == "chosen":
            chosen_out = (lv, lt, tv, tt, op)
        rows.append(OperatingRow(
            label, kind, None if op is None else op.to_dict(),
            None if op is None else operating_metrics(op, lt, tt, classes),
            {} if op is None else curve(p_good(lt, op.temperature, good), tt, good),
            metric_value(metric, tt, preds[kind], len(classes))))
    lv, lt, tv, tt, op = chosen_out
    temperature = op.temperature if op is not None else fit_temperature(lv, tv)
    calib = {"before": calibration(lt, tt, 1.0), "after": calibration(lt, tt, temperature)}
    comparison = None
    if best is not None:
        comparison = paired_bootstrap(tt, preds["chosen"], preds["reference"], len(classes), metric, seed=c.seed)
        comparison |= {"reference": best.label, "metric": metric,
                       "verdict": within_verdict(comparison, MARGIN_POINTS)}
    ceilings = c.ceilings()
    claim = None
    if fit is not None and ceilings.max_escape is not None:
        claim = {"max_escape": ceilings.max_escape, "images_needed": images_needed(ceilings.max_escape),
                 "n_defective_test": rows[0].test["n_defective"]}
    info = QualityInfo(metric, data.good_classes, ceilings.describe() if fit else None, rows, claim, comparison,
                       calib)
    _say(info)
    return info


def _say(q: QualityInfo) -> None:
    ch = q.row("chosen")
    if ch is not None and ch.test:
        console.print(f"chosen {operating_line(ch.test)}")
    if q.comparison:
        console.print(comparison_line(q.comparison))
    console.print(calibration_line(q.calibration))
