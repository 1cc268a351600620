"""The stages of the main job, ``vitfab run``, and ``PIPELINE``: the list that runs them.

1. data      the user's folder or the synthetic X-ray set; one seeded split for every stage
2. baseline  DeiT-B/16 trained (small scale: from scratch at the small image size) or fine-tuned
             (full scale: 224 px from hub or local weights); its accuracy sets the requirement
3. supernet  an AutoFormer supernet trained on the same split (one random subnet per step)
4. search    evolutionary search under params/GMACs limits (``--min-reduction`` x below DeiT-B)
5. finetune  the top-k subnets extracted and fine-tuned (plus one distilled from the baseline
             with ``--distill soft|hard``; it competes like any other and wins only if better)
6. joint     every fine-tuned subnet x ToMe schedule x precision mode: validation top-1 off the
             shelf, speed measured on the device; Pareto front; the choice (``optimize.joint``)
7. final     the chosen configuration fine-tuned with its ToMe schedule on; kept only if
             validation says so; saved as ``chosen/`` (ToMe schedule and precision recorded) and
             evaluated once on the test split
8. export    the chosen model as deploy/: safetensors, TorchScript, ONNX (ToMe inside), parity checked
9. ablation  baseline, each axis, each pair, all three: test metrics and speed, one interleaved run
10. report   report.md, report.html, PNG plots, summary.json

Each stage is a function ``(ctx, **the results it requires) -> its result``; adding one is a new
function and one line in ``PIPELINE``.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from ..data.synth import SynthConfig, synthesize
from ..errors import VitfabError
from ..evaluate.accuracy import validation_accuracy
from ..evaluate.metrics import classification_metrics
from ..evaluate.runner import collect_logits, plot_confusion
from ..export import export_deploy
from ..files import write_json_atomic
from ..measure.bench import BenchConfig, BenchOptions, benchmark
from ..measure.counts import count_macs, count_params
from ..measure.speed import default_batch
from ..models import BASELINE, create_model, read_meta, save_checkpoint
from ..nas.extract import extract_to
from ..nas.search import EvolutionarySearch, Limits, SearchConfig
from ..nas.train import SupernetConfig, build_supernet, load_supernet
from ..precision import Precision, prepare_model
from ..progress import console, task
from ..records import to_json
from ..report import write_report
from ..report.summary import At224, DeployInfo, SpeedRow, TestMetrics
from ..rundir import WEIGHTS_FILE
from ..runtimes import load_model
from ..tome import apply_spec
from ..train.config import checkpoint_model_args
from ..train.loop import build_model, prepare_split
from .ablation import ablation_rows, measure_ablation
from .budget import search_size
from .context import JobContext, Stage
from .joint import JointCandidate, choose, joint_front, joint_search
from .results import (AblationResult, BaselineResult, DataResult, FinalResult, FinetunedModel, FinetuneResult,
                      JointResult, ReportResult, SearchedArch, SearchStageResult, SupernetResult)
from .summary import build_summary


def stage_data(ctx: JobContext) -> DataResult:
    c = ctx.config
    data = c.data
    if data is None:
        data = str(ctx.run.stage_dir("data"))
        if Path(data).exists():  # a synthesis cut short by a kill: the job's own folder, made anew
            shutil.rmtree(data)
        synth = SynthConfig(n_per_class=c.n_per_class, img_size=c.img_size, seed=c.seed, difficulty=c.difficulty)
        with task("synthesising X-ray set", total=len(synth.classes) * c.n_per_class, enabled=ctx.progress) as adv:
            meta = synthesize(data, synth, on_progress=adv)
        console.print(f"synthetic data: {c.n_per_class} images per class at {c.img_size} px in "
                      f"{meta['seconds']:.1f} s -> {data}")
    split = ctx.initial_split or prepare_split(c.train_config(data), ctx.progress)
    split.save(ctx.run.split_path)
    return DataResult(data, c.data is None, list(split.classes),
                      {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                      str(ctx.run.split_path))


def stage_baseline(ctx: JobContext, data: DataResult) -> BaselineResult:
    c, split = ctx.config, data.load_split()
    folder = ctx.run.stage_dir("baseline")
    pretrained = c.scale_settings["pretrained"] and not c.baseline_weights

    def make():
        tc = c.train_config(data.data, model=c.baseline_model)  # random weights: only the speed is probed
        epochs, ips = ctx.epochs_for("baseline", c.baseline_epochs, build_model(tc, split.classes), split)
        return {"epochs": epochs, "baseline_ips": ips}

    plan = ctx.plan("baseline", make)
    e = plan["epochs"]
    tc = c.train_config(data.data, model=c.baseline_model, pretrained=pretrained, weights=c.baseline_weights,
                        epochs=e, warmup_epochs=min(2.0, e / 5), lr=c.scale_settings["baseline_lr"])
    res = ctx.train_stage(folder, tc, split)
    best = str(res.run.find_checkpoint("best"))
    model = load_model(best)
    return BaselineResult(str(folder), best, e, res.best_val.get("val_top1"), count_params(model),
                          count_macs(model) / 1e9, plan["baseline_ips"])


def stage_supernet(ctx: JobContext, data: DataResult) -> SupernetResult:
    c, split = ctx.config, data.load_split()
    base = c.train_config(data.data)
    kw = {k: getattr(base, k) for k in ("data", "img_size", "patch_size", "batch_size", "device")} | c.data_settings()

    def make():
        net = build_supernet(SupernetConfig(space=c.space, **kw), split.classes, with_weights=False)
        net.set_arch(net.space.largest())
        return {"epochs": ctx.epochs_for("supernet", c.supernet_epochs, net, split)[0]}

    e = ctx.plan("supernet", make)["epochs"]
    tc = SupernetConfig(space=c.space, epochs=e, warmup_epochs=min(2.0, e / 5), **kw)
    res = ctx.train_stage(ctx.run.stage_dir("supernet"), tc, split, supernet=True)
    return SupernetResult(str(res.run.root), e, res.best_val.get("val_top1"))


def stage_search(ctx: JobContext, data: DataResult, baseline: BaselineResult,
                 supernet: SupernetResult) -> SearchStageResult:
    c, scale, split = ctx.config, ctx.config.scale_settings, data.load_split()
    net = load_supernet(supernet.run, ctx.device)
    val = ctx.loader(split, "val", net.vitfab_meta.preprocess)
    limits = Limits(max_params=baseline.params / c.min_reduction, max_gmacs=baseline.gmacs / c.min_reduction)
    out = ctx.run.stage_dir("search")

    def make():  # one candidate's accuracy pass, timed, sizes the search
        mid = net.space.sample(random.Random(c.seed))
        t0 = time.perf_counter()
        EvolutionarySearch(net, val, ctx.device, limits, SearchConfig(), out, False).accuracy(mid)
        pop, gens = search_size(ctx.budget.share("search"), time.perf_counter() - t0, scale["population"],
                                scale["generations"], ctx.budget)
        return {"population": pop, "generations": gens}

    p = ctx.plan("search", make)
    pop, gens = p["population"], p["generations"]
    cfg = SearchConfig(population=pop, generations=gens, parents=max(2, pop // 4), mutations=pop // 2,
                       crossovers=pop // 2, seed=c.seed)
    res = EvolutionarySearch(net, val, ctx.device, limits, cfg, out, ctx.progress).run()
    top = [SearchedArch(t.arch, t.accuracy, t.params, t.gmacs) for t in res.ranked[: c.top_k]]
    return SearchStageResult(str(res.out), limits.describe(), pop, gens, res.evaluated, top)


def stage_finetune(ctx: JobContext, data: DataResult, baseline: BaselineResult, supernet: SupernetResult,
                   search: SearchStageResult) -> FinetuneResult:
    c, split = ctx.config, data.load_split()
    net, jobs = None, []  # (label, extracted checkpoint, arch, teacher)
    for k, t in enumerate(search.top, 1):
        extracted = ctx.run.stage_dir("finetune") / f"subnet-{k}-extracted"
        if not (extracted / WEIGHTS_FILE).is_file():
            net = net or load_supernet(supernet.run)
            extract_to(net, t.arch, extracted, source=supernet.run)
        jobs.append((f"subnet-{k}", extracted, t.arch.short(), None))
    if c.distill != "none":
        jobs.append(("subnet-1-kd", jobs[0][1], jobs[0][2], baseline.checkpoint))

    def tc_for(extracted, teacher, epochs):
        return c.train_config(data.data, init_checkpoint=str(extracted), epochs=epochs, lr=3e-4,
                              warmup_epochs=min(1.0, epochs / 5), teacher=teacher,
                              distill=c.distill if teacher else "soft").resolved()

    def make():
        model = build_model(tc_for(jobs[0][1], None, 1), split.classes)
        kd_cost = 0.0
        if c.distill != "none" and baseline.train_img_per_s:  # the teacher's forward pass, ~1/3 of its step
            kd_cost = 1 / (3 * baseline.train_img_per_s) / len(jobs)
        return {"epochs": ctx.epochs_for("finetune", c.finetune_epochs, model, split, parts=len(jobs),
                                         extra_per_image=kd_cost)[0]}

    e = ctx.plan("finetune", make)["epochs"]
    models = []
    for label, extracted, short, teacher in jobs:
        res = ctx.train_stage(ctx.run.stage_dir("finetune") / label, tc_for(extracted, teacher, e), split)
        models.append(FinetunedModel(label, str(res.run.find_checkpoint("best")), short, teacher,
                                     res.best_val.get("val_top1")))
    return FinetuneResult(e, models)


def _baseline_warning(base_acc: float, classes: int, baseline: BaselineResult) -> str | None:
    chance = 1 / classes
    if base_acc >= chance + 0.1 * (1 - chance):  # within a tenth of the way from chance to perfect
        return None
    warning = (f"the baseline is close to chance ({100 * base_acc:.1f} % vs {100 * chance:.1f} %): "
               f"{baseline.epochs} epoch(s) of DeiT-B/16 fit this budget, so the requirement relative to it "
               f"is weak; give more --budget-minutes, --baseline-weights, or --min-accuracy")
    console.print(f"[yellow]warning:[/yellow] {warning}")
    return warning


def stage_joint(ctx: JobContext, data: DataResult, baseline: BaselineResult, finetune: FinetuneResult) -> JointResult:
    c, split = ctx.config, data.load_split()
    base_model = load_model(baseline.checkpoint)
    val = ctx.loader(split, "val", base_model.vitfab_meta.preprocess)
    base_acc = validation_accuracy(prepare_model(base_model, Precision.FP32, ctx.device), val, ctx.device,
                                   Precision.FP32)
    del base_model
    threshold = c.requirement().threshold(base_acc)
    models = [(m.label, m.checkpoint, m.arch) for m in finetune.models]
    modes = c.precision_modes(ctx.device)
    cands = joint_search(models, c.tome_schedules(), modes, val, ctx.device, c.objective,
                         batch_size=default_batch(ctx.device), progress=ctx.progress,
                         min_repeat_seconds=min(0.25, c.measure_seconds or 0.25))
    chosen, met = choose(cands, threshold, c.objective)
    warning = _baseline_warning(base_acc, len(split.classes), baseline)
    front = joint_front(cands, c.objective)
    out = ctx.run.stage_dir("joint")
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "candidates.json", [x.to_dict() for x in cands])
    console.print(f"joint search: {len(cands)} configurations, {len(front)} on the Pareto front; chosen "
                  f"{chosen.key} (val top-1 {100 * chosen.accuracy:.2f} %, {chosen.img_per_s:.0f} img/s)"
                  + ("" if met else " -- NO candidate meets the requirement: the most accurate is kept"))
    return JointResult(base_acc, warning, threshold, c.requirement().describe(base_acc), met, c.objective,
                       [m.value for m in modes], c.tome_schedules(), chosen, [x.key for x in front],
                       str(out / "candidates.json"))


def stage_final(ctx: JobContext, data: DataResult, finetune: FinetuneResult, joint: JointResult) -> FinalResult:
    c, split, chosen = ctx.config, data.load_split(), joint.chosen
    teacher = finetune.model(chosen.model).teacher

    def tc_for(epochs):
        return c.train_config(data.data, init_checkpoint=chosen.checkpoint, tome=chosen.tome, epochs=epochs, lr=1e-4,
                              warmup_epochs=0.0, teacher=teacher, distill=c.distill if teacher else "soft").resolved()

    def make():
        return {"epochs": ctx.epochs_for("final", c.final_epochs, build_model(tc_for(1), split.classes), split)[0]}

    e = ctx.plan("final", make)["epochs"]
    res = ctx.train_stage(ctx.run.stage_dir("final"), tc_for(e), split)
    tuned = load_model(res.run.find_checkpoint("best"))
    p = Precision(chosen.precision)
    val = ctx.loader(split, "val", tuned.vitfab_meta.preprocess)
    tuned_acc = validation_accuracy(prepare_model(tuned, p, ctx.device), val, ctx.device, p)
    keep_tuned = tuned_acc >= chosen.accuracy
    source = res.run.find_checkpoint("best") if keep_tuned else Path(chosen.checkpoint)
    model = apply_spec(load_model(source), chosen.tome)
    save_checkpoint(ctx.run.chosen, model, {"precision": chosen.precision, "choice": chosen.to_dict(),
                                            "fine_tuned_with_tome": keep_tuned, "run": str(ctx.run.root)})
    test = ctx.loader(split, "test", model.vitfab_meta.preprocess)
    logits, targets = collect_logits(prepare_model(model, p, ctx.device), test, ctx.device, progress=ctx.progress,
                                     description="test (chosen)")
    m = classification_metrics(logits, targets, model.vitfab_meta.classes, c.good_class)
    write_json_atomic(ctx.run.chosen / "test.json", m)
    plot_confusion(m, ctx.run.report_dir / "confusion_chosen.png",
                   f"chosen: {chosen.arch}, {chosen.tome or 'no ToMe'}, {chosen.precision} (test)")
    console.print(f"final fine-tune ({e} epochs with {'ToMe ' + chosen.tome if chosen.tome else 'no ToMe'}): "
                  f"val top-1 {100 * tuned_acc:.2f} % vs {100 * chosen.accuracy:.2f} % off the shelf -> "
                  f"{'kept' if keep_tuned else 'not kept'}; test top-1 {100 * m['top1']:.2f} %")
    return FinalResult(str(res.run.root), e, tuned_acc, chosen.accuracy, keep_tuned, str(ctx.run.chosen),
                       chosen.checkpoint, TestMetrics.of(m))


def stage_export(ctx: JobContext, final: FinalResult) -> DeployInfo:
    """The chosen model as deploy/ (safetensors, TorchScript, ONNX with ToMe inside), checked
    against PyTorch fp32 in ONNX Runtime; where that fails the chosen checkpoint stands."""
    try:
        info = export_deploy(final.checkpoint, ctx.run.deploy)
    except VitfabError as exc:
        console.print(f"[yellow]warning:[/yellow] export failed: {exc}")
        return DeployInfo(None, str(exc), {})
    console.print("deploy/: " + ", ".join(f"{k} max |logit difference| {v:.1e}"
                                          for k, v in info["parity_max_abs_diff"].items()))
    return DeployInfo(str(ctx.run.deploy), None, info["parity_max_abs_diff"])


def _speed_at_224(ctx: JobContext, chosen: JointCandidate, seconds: float, classes: list[str]) -> At224:
    """The chosen architecture, schedule and precision at 224 px / patch 16 (random weights)
    against DeiT-B/16 fp32: speed does not depend on the weights, accuracy is not claimed."""
    arch = checkpoint_model_args(chosen.checkpoint)  # the architecture alone, not its weights
    m = create_model(arch["model"], classes=classes, img_size=224, patch_size=16, **arch["model_args"])
    folder = ctx.run.stage_dir("ablation") / "chosen-arch-224"
    save_checkpoint(folder, m, {"note": "random weights; for speed only"})
    cfgs = [BenchConfig(model=BASELINE, img_size=224, label="DeiT-B/16 fp32 @224"),
            BenchConfig(checkpoint=str(folder), precision=chosen.precision, tome_r=chosen.tome,
                        label=f"chosen @224 ({chosen.arch}, {chosen.tome or 'no ToMe'}, {chosen.precision})")]
    opts = BenchOptions(device=str(ctx.device), repeats=3, min_repeat_seconds=seconds, latency_runs=10, energy=False)
    ms = benchmark(cfgs, opts, progress=ctx.progress)
    rows = [SpeedRow(x.label, x.params, round(x.gmacs, 4), round(x.img_per_s, 2), round(x.latency_ms["p50"], 3),
                     x.batch_size) for x in ms]
    return At224(rows, round(ms[1].img_per_s / ms[0].img_per_s, 2), round(ms[0].params / ms[1].params, 2),
                 round(ms[0].macs / ms[1].macs, 2))


def stage_ablation(ctx: JobContext, data: DataResult, baseline: BaselineResult, joint: JointResult,
                   final: FinalResult) -> AblationResult:
    c, split, chosen = ctx.config, data.load_split(), joint.chosen
    schedules = c.tome_schedules()
    default_tome = "macs=0.5" if "macs=0.5" in schedules else next((s for s in schedules if s), "macs=0.5")
    subnet = final.subnet_checkpoint if chosen.tome else final.checkpoint
    name = "DeiT-B/16 baseline" if c.baseline_model == BASELINE else f"{c.baseline_model} baseline"
    rows = ablation_rows(baseline.checkpoint, subnet, final.checkpoint, chosen.tome, chosen.precision,
                         c.precision_modes(ctx.device), ctx.device, default_tome, name)
    test = ctx.loader(split, "test", read_meta(final.checkpoint).preprocess)
    small = ctx.budget.seconds is not None
    seconds = c.measure_seconds if c.measure_seconds is not None else (0.5 if small else 1.0)
    opts = BenchOptions(device=str(ctx.device), repeats=3 if small else 5, min_repeat_seconds=seconds,
                        latency_runs=20 if small else 50)
    records = measure_ablation(rows, test, opts, c.good_class, progress=ctx.progress)
    at224 = _speed_at_224(ctx, chosen, seconds, split.classes) if c.img_size != 224 and c.speed_at_224 else None
    write_json_atomic(ctx.run.report_dir / "ablation.json", to_json(records))
    return AblationResult(records, at224, default_tome)


def stage_report(ctx: JobContext, **results) -> ReportResult:
    files = write_report(ctx.run.root, build_summary(ctx, results))
    return ReportResult([str(f) for f in files])


PIPELINE: tuple[Stage, ...] = (
    Stage("data", 0.05, stage_data, (), DataResult),
    Stage("baseline", 3.0, stage_baseline, ("data",), BaselineResult),
    Stage("supernet", 3.0, stage_supernet, ("data",), SupernetResult),
    Stage("search", 0.7, stage_search, ("data", "baseline", "supernet"), SearchStageResult),
    Stage("finetune", 1.6, stage_finetune, ("data", "baseline", "supernet", "search"), FinetuneResult),
    Stage("joint", 0.8, stage_joint, ("data", "baseline", "finetune"), JointResult),
    Stage("final", 0.6, stage_final, ("data", "finetune", "joint"), FinalResult),
    Stage("export", 0.2, stage_export, ("final",), DeployInfo),
    Stage("ablation", 1.3, stage_ablation, ("data", "baseline", "joint", "final"), AblationResult),
    Stage("report", 0.3, stage_report, ("data", "joint", "final", "export", "ablation"), ReportResult),
)
