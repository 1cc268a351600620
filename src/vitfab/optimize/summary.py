"""The main job's ``Summary`` (summary.json, and what the report renders), from its stages' typed results."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from ..evaluate.accuracy import METRIC_NAMES
from ..measure.measurement import device_name
from ..runtime import processes
from ..report.summary import (AblationRecord, BudgetInfo, CandidateRow, ChosenInfo, DataInfo, DeviceInfo, JointInfo,
                              ReferenceInfo, Summary, TeachingInfo, metric_of)
from .context import JobContext
from .results import AblationResult, DataResult, FinalResult, JointResult, PilotResult, ReferencesResult


def _joint_info(joint: JointResult) -> JointInfo:
    front = set(joint.front)
    rows = [CandidateRow(c.key, c.model, c.accuracy, c.macro_f1, c.gmacs, c.img_per_s, c.latency_ms, c.joules_per_img,
                         c.error, c.key in front, c.key == joint.chosen.key, c.balanced_accuracy, c.operating,
                         c.runtime, c.screened_out)
            for c in joint.candidates()]
    return JointInfo(joint.metric, joint.requirement, joint.requirement_met, joint.requirement_source, joint.threshold,
                     joint.baseline_val, joint.reference_val, joint.warning, joint.objective, joint.schedules,
                     joint.precisions, rows, joint.ceilings, joint.ceilings_met, joint.shortfall, joint.runtimes)


def verdicts(rows: list[AblationRecord], metric: str) -> list[str]:
    """Plain statements where a reference beats the chosen ViT on both test accuracy and speed."""
    chosen = next((r for r in rows if r.chosen), None)
    if chosen is None:
        return []
    name = METRIC_NAMES[metric]

    def value(r):
        return metric_of(r, metric) or 0.0

    return [f"{r.name.replace(' (reference)', '')} is both more accurate ({100 * value(r):.2f} % vs "
            f"{100 * value(chosen):.2f} % test {name}) and faster ({r.img_per_s:.0f} vs {chosen.img_per_s:.0f} img/s) "
            f"than the chosen ViT configuration"
            for r in rows if r.kind == "reference" and value(r) > value(chosen) and r.img_per_s > chosen.img_per_s]


def starts(results: dict[str, Any]) -> dict[str, str]:
    """What each trained model started from (hub weights, a file, weight selection, random)."""
    out = {m.label: m.start for m in results["references"].models}
    for key, label in (("baseline", "DeiT-B/16 baseline"), ("supernet", "supernet")):
        if key in results:
            out[label] = results[key].start
    return out


def build_summary(ctx: JobContext, results: dict[str, Any], wall_seconds: float | None = None) -> Summary:
    """``results``: the typed result of every finished stage, by name (data, references, pilot,
    joint and final at least)."""
    c = ctx.config
    data: DataResult = results["data"]
    references: ReferencesResult = results["references"]
    pilot: PilotResult = results["pilot"]
    joint: JointResult = results["joint"]
    final: FinalResult = results["final"]
    ablation: AblationResult | None = results.get("ablation")
    ch, b = joint.chosen, ctx.budget
    rows = ablation.rows if ablation else []
    return Summary(
        run=str(ctx.run.root),
        device=DeviceInfo(ctx.device.type, device_name(ctx.device), torch.get_num_threads(), torch.__version__,
                          ctx.amp, processes(), c.batch_size),
        data=DataInfo(data.data, data.synthetic, data.classes, data.images, c.img_size, c.patch_size, c.scale),
        config=asdict(c),
        objective=c.objective,
        joint=_joint_info(joint),
        chosen=ChosenInfo(ch.model, ch.arch, ch.tome, ch.precision, ch.r_per_layer, ch.params, ch.gmacs,
                          final.checkpoint, final.val, final.test, ch.tome_name),
        references=[ReferenceInfo(m.label, m.name, m.checkpoint, m.epochs, m.seconds, m.budget_seconds, m.val_top1,
                                  m.val_macro_f1, m.start, m.val_balanced_accuracy) for m in references.models],
        teaching=TeachingInfo(references.teacher_label, references.teacher, pilot.mode, pilot.reason),
        verdicts=verdicts(rows, joint.metric),
        ablation=rows,
        default_tome=ablation.default_tome if ablation else None,
        at_224=ablation.at_224 if ablation else None,
        deploy=results.get("export"),
        budget=BudgetInfo(b.seconds, b.spent, list(b.cuts), ctx.state.seconds()),
        stage_results={k: v["result"] for k, v in ctx.state.stages.items()},
        starts=starts(results),
        embed=pilot.embed,
        embed_reason=pilot.embed_reason,
        quality=results.get("quality"),
        wall_seconds_this_call=wall_seconds,
    )
