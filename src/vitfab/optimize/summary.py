"""The main job's ``Summary`` (summary.json, and what the report renders), from its stages' typed results."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from ..measure.measurement import device_name
from ..report.summary import BudgetInfo, CandidateRow, ChosenInfo, DataInfo, DeviceInfo, JointInfo, Summary
from .context import JobContext
from .results import AblationResult, DataResult, FinalResult, JointResult


def _joint_info(joint: JointResult) -> JointInfo:
    front = set(joint.front)
    rows = [CandidateRow(c.key, c.model, c.accuracy, c.gmacs, c.img_per_s, c.latency_ms, c.joules_per_img, c.error,
                         c.key in front, c.key == joint.chosen.key) for c in joint.candidates()]
    return JointInfo(joint.requirement, joint.requirement_met, joint.threshold, joint.baseline_val_top1,
                     joint.baseline_warning, joint.objective, joint.schedules, joint.precisions, rows)


def build_summary(ctx: JobContext, results: dict[str, Any], wall_seconds: float | None = None) -> Summary:
    """``results``: the typed result of every finished stage, by name (data, joint and final at least)."""
    c = ctx.config
    data: DataResult = results["data"]
    joint: JointResult = results["joint"]
    final: FinalResult = results["final"]
    ablation: AblationResult | None = results.get("ablation")
    ch = joint.chosen
    b = ctx.budget
    return Summary(
        run=str(ctx.run.root),
        device=DeviceInfo(ctx.device.type, device_name(ctx.device), torch.get_num_threads(), torch.__version__,
                          ctx.amp),
        data=DataInfo(data.data, data.synthetic, data.classes, data.images, c.img_size, c.patch_size, c.scale),
        config=asdict(c),
        objective=c.objective,
        joint=_joint_info(joint),
        chosen=ChosenInfo(ch.model, ch.arch, ch.tome, ch.precision, ch.r_per_layer, ch.params, ch.gmacs,
                          final.checkpoint, final.val_top1, final.test),
        ablation=ablation.rows if ablation else [],
        default_tome=ablation.default_tome if ablation else None,
        at_224=ablation.at_224 if ablation else None,
        deploy=results.get("export"),
        budget=BudgetInfo(b.seconds, b.spent, list(b.cuts), ctx.state.seconds()),
        stage_results={k: v["result"] for k, v in ctx.state.stages.items()},
        wall_seconds_this_call=wall_seconds,
    )
