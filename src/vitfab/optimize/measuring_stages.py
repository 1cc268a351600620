"""The main job's measuring and choosing stages: the architecture search, the joint search and the
choice, the export, the ablation and the report (see ``stages``)."""

from __future__ import annotations

import random
import time
from dataclasses import asdict

from ..errors import VitfabError
from ..evaluate.accuracy import METRIC_NAMES, validation_scores
from ..evaluate.runner import image_batches
from ..export import export_deploy, export_images
from ..files import write_json_atomic
from ..measure.bench import BenchConfig, BenchOptions, benchmark
from ..measure.speed import default_batch
from ..models import BASELINE, create_model, read_meta, save_checkpoint
from ..nas.search import EvolutionarySearch, Limits, SearchConfig
from ..nas.train import load_supernet
from ..precision import Precision, prepare_model
from ..runtime import map_shards, on_main
from ..progress import console
from ..records import to_json
from ..report import write_report
from ..report.summary import At224, DeployInfo, SpeedRow
from ..runtimes import CALIBRATION_IMAGES, load_model
from ..tome import Schedule
from ..train.config import checkpoint_model_args
from .ablation import AblationRow, ablation_rows, default_bits, measure_ablation, runtime_rows
from .budget import search_size
from .context import JobContext
from .joint import JointCandidate, choose, joint_front, joint_search, shortfall
from .results import (AblationResult, BaselineResult, DataResult, FinalResult, FinetuneResult, JointResult,
                      ReferencesResult, ReportResult, SearchedArch, SearchStageResult, SupernetResult)
from .runtime_search import TIGHT_SHARE, resolve_runtimes, runtime_pass, screen_size
from .schedule_search import probe_batches, probe_record, search_schedules
from .summary import build_summary


def stage_search(ctx: JobContext, data: DataResult, baseline: BaselineResult,
                 supernet: SupernetResult) -> SearchStageResult:
    c, scale, split = ctx.config, ctx.config.scale_settings, data.load_split()
    net = load_supernet(supernet.run, ctx.device)
    val = ctx.loader(split, "val", net.vitfab_meta.preprocess)
    limits = Limits(max_params=baseline.params / c.min_reduction, max_gmacs=baseline.gmacs / c.min_reduction)
    out, metric = ctx.run.stage_dir("search"), data.metric

    def make():  # one candidate's accuracy pass, timed, sizes the search
        mid = net.space.sample(random.Random(c.seed))
        t0 = time.perf_counter()
        EvolutionarySearch(net, val, ctx.device, limits, SearchConfig(), out, False, metric).accuracy(mid)
        pop, gens = search_size(ctx.budget.share("search"), time.perf_counter() - t0, scale["population"],
                                scale["generations"], ctx.budget)
        return {"population": pop, "generations": gens}

    p = ctx.plan("search", make)
    pop, gens = p["population"], p["generations"]
    cfg = SearchConfig(population=pop, generations=gens, parents=max(2, pop // 4), mutations=pop // 2,
                       crossovers=pop // 2, seed=c.seed)
    res = EvolutionarySearch(net, val, ctx.device, limits, cfg, out, ctx.progress, metric).run()
    top = [SearchedArch(t.arch, t.accuracy, t.params, t.gmacs) for t in res.ranked[: c.top_k]]
    return SearchStageResult(str(res.out), limits.describe(), pop, gens, res.evaluated, top)


def _weak_requirement(value: float, classes: int, source: str, metric: str) -> str | None:
    chance = 1 / classes
    if value >= chance + 0.1 * (1 - chance):  # within a tenth of the way from chance to perfect
        return None
    warning = (f"the requirement comes from {source} at {100 * value:.1f} % validation {METRIC_NAMES[metric]}, "
               f"close to chance ({100 * chance:.1f} %), so it is weak; give more --budget-minutes, "
               f"--baseline-weights, or --min-accuracy")
    console.print(f"[yellow]warning:[/yellow] {warning}")
    return warning


def _requirement_source(ctx: JobContext, baseline_val: float, ref_val: dict[str, float]) -> tuple[str, str, float]:
    """(label, how the report names it, value) of what the requirement is measured from."""
    how = ctx.config.requirement_from
    if how == "baseline" or not ref_val:
        return "baseline", "the DeiT-B/16 baseline", baseline_val
    label = max(ref_val, key=ref_val.get) if how == "best" else next(
        (k for k in ref_val if how.lower() == k.lower()), None)
    if label is None:
        raise VitfabError(f"--requirement-from {how}: no such reference (trained: {', '.join(ref_val)})")
    return label, (f"the best reference ({label})" if how == "best" else f"the reference {label}"), ref_val[label]


def repeat_seconds(given: float | None, share: float | None, repeats: int, cap: float = 1.0) -> float:
    """Seconds per timed repeat: ``--measure-seconds`` where given, else what makes the ``repeats``
    take about 40 % of the stage's share (the rest is accuracy passes and loading), within [0.1, cap]."""
    if given is not None:
        return given
    return cap if share is None else min(cap, max(0.1, 0.4 * share / max(repeats, 1)))


def _searched_schedules(ctx: JobContext, split, models, out) -> tuple[dict[str, list[tuple[str, str]]], list]:
    """Each trained model's searched schedule for each macs= target of the grid (``schedule_search``),
    best-ranked first, within about a third of the joint stage's share, split evenly over the models
    still to search (so the first one's refinement does not starve the rest; a model whose probe
    does not fit its part is left out, and the cut recorded); written to joint/schedules.json."""
    targets = [s for s in ctx.config.tome_schedules() if s and Schedule.parse(s).kind == "macs"]
    if not ctx.config.tome_search or not targets:
        return {}, []
    share = ctx.budget.share("joint")
    allowed = None if share is None else share / 3
    searched, records, t0 = {}, [], time.perf_counter()
    for k, (label, ckpt, _) in enumerate(models):
        model = load_model(ckpt)
        batches = probe_batches(split.root, split.train, model.vitfab_meta.preprocess)
        left = None if allowed is None else (allowed - (time.perf_counter() - t0)) / (len(models) - k)
        probe = search_schedules(label, model, targets, batches, ctx.device, left, ctx.config.seed)
        if probe is None:
            cut = (f"ToMe schedule search: {label} left out (its probe does not fit its {max(left, 0):.0f} s of "
                   f"a third of the joint share)")
            ctx.budget.cut(cut)
            console.print(cut)
            continue
        records.append(probe_record(probe))
        searched[label] = [(s.name, s.spec) for s in probe.schedules if not s.is_fixed]
        console.print(f"ToMe schedules searched for {label} in {probe.seconds:.0f} s: " + "; ".join(
            f"{s.target}: r {s.spec} (probe loss {s.loss:.3f}, the constant r's {s.fixed_loss:.3f})"
            for s in probe.schedules))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "schedules.json", records)
    return searched, records


def stage_joint(ctx: JobContext, data: DataResult, baseline: BaselineResult, references: ReferencesResult,
                finetune: FinetuneResult) -> JointResult:
    """Under ``torchrun`` the validation passes are shared out over the ranks; the schedule search,
    every timing, the other runtimes and the choice are rank 0's."""
    c, split = ctx.config, data.load_split()
    metric = data.metric
    pre = read_meta(baseline.checkpoint).preprocess
    val = ctx.loader(split, "val", pre)
    fp32 = Precision.FP32

    def val_of(checkpoint):
        return validation_scores(prepare_model(load_model(checkpoint), fp32, ctx.device), val, ctx.device,
                                 fp32)[metric]

    baseline_val, *refs = map_shards(val_of, [baseline.checkpoint] + [m.checkpoint for m in references.models])
    ref_val = {m.label: v for m, v in zip(references.models, refs)}
    models = [(m.label, m.checkpoint, m.arch) for m in finetune.models]
    modes = c.precision_modes(ctx.device)
    fit = data.operating_fitter(c.ceilings())
    out = ctx.run.stage_dir("joint")
    searched, probes = on_main(lambda: _searched_schedules(ctx, split, models, out))
    configs = len(models) * len(c.tome_schedules()) + sum(len(v) for v in searched.values())
    timed = configs * len(modes) * 3  # three interleaved repeats each
    cands = joint_search(models, c.tome_schedules(), modes, val, ctx.device, c.objective,
                         batch_size=default_batch(ctx.device), progress=ctx.progress,
                         min_repeat_seconds=repeat_seconds(c.measure_seconds, ctx.budget.share("joint"), timed, 0.5),
                         operating=fit, searched=searched)
    return on_main(lambda: _choose_joint(ctx, data, pre, val, cands, (baseline_val, ref_val), probes, timed))


def _choose_joint(ctx: JobContext, data: DataResult, pre, val, cands: list[JointCandidate],
                  measured: tuple[float, dict[str, float]], probes: list, timed: int) -> JointResult:
    """The joint stage on rank 0: the other runtimes, the requirement, the choice, the record."""
    c, split, metric, (baseline_val, ref_val) = ctx.config, data.load_split(), data.metric, measured
    source, how, value = _requirement_source(ctx, baseline_val, ref_val)
    threshold = c.requirement().threshold(value)
    modes, fit, out = c.precision_modes(ctx.device), data.operating_fitter(c.ceilings()), ctx.run.stage_dir("joint")
    axis = resolve_runtimes(c.runtime_names(), ctx.device)
    if len(axis.used) > 1:
        calib = image_batches(split.root, split.train, pre, CALIBRATION_IMAGES)
        cands = runtime_pass(cands, axis, threshold, c.objective, metric, val, ctx.device, out / "artifacts", calib,
                             load_model, fit, default_batch(ctx.device), progress=ctx.progress,
                             min_repeat_seconds=repeat_seconds(c.measure_seconds, ctx.budget.share("joint"),
                                                               timed, 0.5), limit=screen_size(ctx.budget.share("joint")))
        console.print(f"runtimes: {', '.join(axis.used)}; {', '.join(axis.screened) or 'nothing'} went on from the "
                      f"PyTorch pass, {axis.screened_out} PyTorch configurations screened out")
    chosen, met = choose(cands, threshold, c.objective, metric)
    missed = shortfall(cands, threshold, metric)
    warning = _weak_requirement(value, len(split.classes), how, metric)
    front = joint_front(cands, c.objective, metric)
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "candidates.json", [x.to_dict() for x in cands])
    name = METRIC_NAMES[metric]
    op = chosen.operating
    console.print(f"joint search: {len(cands)} configurations, {len(front)} on the Pareto front; chosen "
                  f"{chosen.key} (val {name} {100 * chosen.score(metric):.2f} %, {chosen.img_per_s:.0f} img/s"
                  + ("" if op is None else f", escape {100 * op['escape_rate']:.1f} %, overkill "
                                           f"{100 * op['overkill_rate']:.1f} % at its operating point") + ")"
                  + ("" if met else " -- NO candidate meets the requirement" + (f": {missed}" if missed else "")))
    return JointResult(metric, baseline_val, ref_val, source, warning, threshold,
                       c.requirement().describe(value, how, name), met, c.objective, [m.value for m in modes],
                       c.tome_schedules(), chosen, [x.key for x in front], str(out / "candidates.json"),
                       c.ceilings().describe() if fit else None, chosen.meets_ceilings, missed, asdict(axis),
                       probes or None)


def stage_export(ctx: JobContext, final: FinalResult) -> DeployInfo:
    """The chosen model as deploy/ (safetensors, TorchScript, ONNX with ToMe inside, OpenVINO IR, and
    the chosen runtime's low-precision artifact), checked against PyTorch fp32 on validation images;
    where that fails the chosen checkpoint stands."""
    try:
        model = load_model(final.checkpoint)
        calib, check = export_images(ctx.run.root, model, None)
        info = export_deploy(final.checkpoint, ctx.run.deploy, model=model, calibration=calib, check=check)
    except VitfabError as exc:
        console.print(f"[yellow]warning:[/yellow] export failed: {exc}")
        return DeployInfo(None, str(exc), {})
    low = info["low_precision_check"]
    console.print("deploy/: " + ", ".join(f"{k} max |logit difference| {v:.1e}"
                                          for k, v in info["parity_max_abs_diff"].items())
                  + ("" if low is None else f"; {info['runtime']} {info['precision']}: argmax agreement "
                                            f"{100 * low['argmax_agreement']:.1f} % of {low['images']} validation images, "
                                            f"max |logit difference| {low['max_abs_diff']:.2f}"))
    return DeployInfo(str(ctx.run.deploy), None, info["parity_max_abs_diff"])


def _speed_at_224(ctx: JobContext, chosen: JointCandidate, seconds: float, classes: list[str]) -> At224:
    """The chosen architecture, schedule and precision at 224 px / patch 16 (random weights)
    against DeiT-B/16 fp32: speed does not depend on the weights, accuracy is not claimed."""
    arch = checkpoint_model_args(chosen.checkpoint)  # the architecture alone, not its weights
    # a conv stem's recorded widths are one stride-2 stage per halving of its patch: at patch 16 the
    # stem is rebuilt with its default widths (one stage more)
    args = {k: v for k, v in arch["model_args"].items() if k != "stem"}
    m = create_model(arch["model"], classes=classes, img_size=224, patch_size=16, **args)
    folder = ctx.run.stage_dir("ablation") / "chosen-arch-224"
    save_checkpoint(folder, m, {"note": "random weights; for speed only"})
    cfgs = [BenchConfig(model=BASELINE, img_size=224, label="DeiT-B/16 fp32 @224"),
            BenchConfig(checkpoint=str(folder), precision=chosen.precision, tome_r=chosen.tome_target,
                        label=f"chosen @224 ({chosen.arch}, {chosen.tome_target or 'no ToMe'}, {chosen.precision})")]
    opts = BenchOptions(device=str(ctx.device), repeats=3, min_repeat_seconds=seconds, latency_runs=10, energy=False)
    ms = benchmark(cfgs, opts, progress=ctx.progress)
    rows = [SpeedRow(x.label, x.params, round(x.gmacs, 4), round(x.img_per_s, 2), round(x.latency_ms["p50"], 3),
                     x.batch_size) for x in ms]
    return At224(rows, round(ms[1].img_per_s / ms[0].img_per_s, 2), round(ms[0].params / ms[1].params, 2),
                 round(ms[0].macs / ms[1].macs, 2))


def reference_rows(references: ReferencesResult, bits: str) -> list[AblationRow]:
    """Each reference as it would run: fp32, and in the bit-width the ablation uses."""
    rows = []
    for m in references.models:
        for p in dict.fromkeys(("fp32", bits)):
            rows.append(AblationRow(f"{m.label}{'' if p == 'fp32' else ' ' + p} (reference)", ("reference",),
                                    m.checkpoint, None, p, kind="reference"))
    return rows


def stage_ablation(ctx: JobContext, data: DataResult, baseline: BaselineResult, references: ReferencesResult,
                   joint: JointResult, final: FinalResult) -> AblationResult:
    c, split, chosen = ctx.config, data.load_split(), joint.chosen
    schedules = c.tome_schedules()
    default_tome = "macs=0.5" if "macs=0.5" in schedules else next((s for s in schedules if s), "macs=0.5")
    subnet = final.subnet_checkpoint if chosen.tome else final.checkpoint
    name = "DeiT-B/16 baseline" if c.baseline_model == BASELINE else f"{c.baseline_model} baseline"
    modes = c.precision_modes(ctx.device)
    rows = ablation_rows(baseline.checkpoint, subnet, final.checkpoint, chosen.tome, chosen.precision, modes,
                         ctx.device, default_tome, name, chosen.tome_target)
    bits = chosen.precision if chosen.precision != "fp32" else default_bits(ctx.device, modes).value
    used = (joint.runtimes or {}).get("used", ["torch"])
    share = ctx.budget.share("ablation")
    rows += runtime_rows(baseline.checkpoint, next(r for r in rows if r.chosen), chosen.runtime,
                         used if share is None or share >= TIGHT_SHARE else [next(r for r in (chosen.runtime, *used)
                                                                                  if r != "torch")], ctx.device,
                         name) if len(used) > 1 else []
    rows += reference_rows(references, bits)
    pre = read_meta(final.checkpoint).preprocess
    test = ctx.loader(split, "test", pre)
    calib = image_batches(split.root, split.train, pre, CALIBRATION_IMAGES) if len(used) > 1 else None
    repeats = 3 if share is not None else 5
    seconds = repeat_seconds(c.measure_seconds, share, len(rows) * repeats + 6)
    opts = BenchOptions(device=str(ctx.device), repeats=repeats, min_repeat_seconds=seconds,
                        latency_runs=20 if share is not None else 50)
    records = measure_ablation(rows, test, opts, c.good_class, progress=ctx.progress, calibration=calib)
    at224 = _speed_at_224(ctx, chosen, seconds, split.classes) if c.img_size != 224 and c.speed_at_224 else None
    write_json_atomic(ctx.run.report_dir / "ablation.json", to_json(records))
    return AblationResult(records, at224, default_tome)


def stage_report(ctx: JobContext, **results) -> ReportResult:
    files = write_report(ctx.run.root, build_summary(ctx, results))
    return ReportResult([str(f) for f in files])
