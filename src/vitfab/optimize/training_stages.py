"""The main job's training stages: data, references, the distillation pilot, the DeiT-B/16
baseline, the supernet, the subnet fine-tunes and the final fine-tune (see ``stages``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..data.synth import SynthConfig, synthesize
from ..errors import CheckpointError
from ..evaluate.accuracy import METRIC_NAMES, scores_of, validation_outputs
from ..evaluate.operating import OperatingPoint, operating_metrics
from ..evaluate.metrics import classification_metrics
from ..evaluate.runner import collect_logits, image_batches, plot_confusion
from ..files import write_json_atomic
from ..measure.counts import count_macs, count_params
from ..models import create_model, save_checkpoint
from ..models.factory import is_vit
from ..models.subnet import subnet_kwargs
from ..nas.extract import extract_to
from ..nas.train import SupernetConfig, build_supernet, load_supernet
from ..precision import Precision
from ..progress import console, task
from ..report.summary import TestMetrics
from ..rundir import WEIGHTS_FILE
from ..runtime import on_main
from ..runtimes import CALIBRATION_IMAGES, load_model
from ..tome import apply_spec
from ..train import TrainConfig
from ..train.loop import build_model, prepare_split
from .budget import probe_train_speed
from .config import REFERENCE_SHARE, passable_classes
from .context import JobContext
from .results import (BaselineResult, DataResult, FinalResult, FinetunedModel, FinetuneResult, JointResult,
                      PilotResult, ReferenceModel, ReferencesResult, SearchStageResult, SupernetResult)
from .runtime_search import in_runtime

LABELS = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "deit_tiny_patch16_224": "DeiT-Tiny",
          "deit_small_patch16_224": "DeiT-S", "efficientnet_b0": "EfficientNet-B0",
          "mobilenetv3_large_100": "MobileNetV3-L"}
PILOT_MODES = ("none", "soft", "hard")  # tried in this order; see pilot_choice
PILOT_EMBEDS = ("conv", "spt")  # tried against patch where --embed auto


def hub_weights(ctx: JobContext, name: str, label: str) -> tuple[bool, str]:
    """At --scale full: whether timm's hub weights of ``name`` can be had (tried once per run and
    recorded in its plan); (False, why) at small scale or offline, said in one line."""
    if not ctx.config.scale_settings["pretrained"]:
        return False, "random weights"

    def make():
        try:
            create_model(name, pretrained=True)
        except CheckpointError as exc:
            return {"ok": False, "why": str(exc).split(";")[0]}
        return {"ok": True, "why": f"timm hub weights of {name}"}

    plan = ctx.plan(f"hub:{name}", make)
    if not plan["ok"]:
        console.print(f"{label}: no pretrained weights ({plan['why']}): trained from random weights")
        return False, f"random weights (no hub weights: {plan['why']})"
    return True, plan["why"]


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
    metric = c.resolved_metric(split.imbalanced)
    if split.imbalanced:
        console.print(f"imbalanced classes ({split.imbalance_ratio():.1f}:1): every stage trains class-balanced")
    console.print(f"metric of the requirement and every selection: {METRIC_NAMES[metric]}"
                  + (" (--metric)" if c.metric != "auto" else " (the imbalance rule)"))
    good = passable_classes(split, c.good_class, c.ceilings())
    return DataResult(data, c.data is None, list(split.classes),
                      {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                      str(ctx.run.split_path), metric, good)


def reference_config(ctx: JobContext, data: str, name: str, epochs: int = 1, time_limit: float | None = None,
                     pretrained: bool = False) -> TrainConfig:
    """The reference recipe: AdamW lr 1e-3, weight decay 0.05, cosine over the epochs, label smoothing
    0.1, flips and 90-degree rotations, mixed precision, batch 32, the epoch with the best validation
    value of the run's metric kept. A ViT reference keeps vitfab's small-data ViT settings (batch and
    warm-up of the run, lr 5e-4, the run's drop-path), a ViT at lr 1e-3 without warm-up does worse."""
    c = ctx.config
    vit = is_vit(create_model(name, num_classes=2, img_size=c.img_size))
    recipe = (dict(patch_size=c.patch_size, lr=5e-4, warmup_epochs=min(1.0, epochs / 5)) if vit
              else dict(patch_size=None, batch_size=32, lr=1e-3, warmup_epochs=0.0, drop_path=0.0))
    if pretrained:  # fine-tuning hub weights: the lower learning rate of a fine-tune
        recipe["lr"] = None
    return c.train_config(data, model=name, weight_decay=0.05, label_smoothing=0.1,
                          epochs=epochs, time_limit=time_limit, pretrained=pretrained, **recipe)


def stage_references(ctx: JobContext, data: DataResult) -> ReferencesResult:
    c, split = ctx.config, data.load_split()
    metric, names, models = data.metric, c.reference_names(), []
    share = ctx.budget.share("references")
    total = ctx.budget.seconds
    each = None if share is None else max(REFERENCE_SHARE * total, share / max(len(names), 1))
    for name in names:
        label = LABELS.get(name, name)
        pretrained, start = hub_weights(ctx, name, f"reference {label}")

        def make(name=name):
            if each is None:
                return {"epochs": c.reference_epochs}
            sec, _ = ctx.epoch_seconds(build_model(reference_config(ctx, data.data, name), split.classes), split)
            return {"epochs": ctx.budget.fit(f"reference {label}", each, c.reference_epochs, sec)[0]}

        epochs = ctx.plan(f"reference:{name}", make)["epochs"]
        tc = reference_config(ctx, data.data, name, epochs, ctx.time_limit(each), pretrained)
        res = ctx.train_stage(ctx.run.stage_dir("references") / name, tc, split)
        best = res.best_val
        models.append(ReferenceModel(name, label, str(res.run.root), str(res.run.find_checkpoint("best")), epochs,
                                     round(res.seconds, 1), each, best.get("val_top1", 0.0),
                                     best.get("val_macro_f1", 0.0), start, best.get("val_balanced_accuracy", 0.0)))
        console.print(f"reference {label}: val {METRIC_NAMES[metric]} {100 * models[-1].score(metric):.2f} % after "
                      f"{epochs} epochs ({res.seconds:.0f} s)")
    return pick_teacher(models, metric, c.teacher)


def pick_teacher(models: list[ReferenceModel], metric: str, teacher: str | None = None) -> ReferencesResult:
    """The best reference on the validation metric (the first of equals) teaches, unless a
    ``teacher`` checkpoint is given."""
    best = max(models, key=lambda m: m.score(metric), default=None)
    label = f"--teacher {teacher}" if teacher else (best.label if best else None)
    return ReferencesResult(models, metric, best.label if best else None,
                            teacher or (best.checkpoint if best else None), label)


def _pilot_student(ctx: JobContext, data: str, mode: str, teacher: str | None, epochs: int, fraction: float,
                   time_limit: float | None, embed: str = "patch") -> TrainConfig:
    c = ctx.config
    space = SupernetConfig(space=c.space, img_size=c.img_size, patch_size=c.patch_size).search_space()
    args = subnet_kwargs(space.smallest(), space.head_dim) | ({"embed": embed} if embed != "patch" else {})
    return c.train_config(data, model="vitfab_subnet", model_args=args,
                          epochs=epochs, epoch_fraction=fraction, warmup_epochs=0.0, lr=5e-4,
                          teacher=teacher if mode != "none" else None, distill=mode if mode != "none" else "soft",
                          time_limit=time_limit)


def stage_pilot(ctx: JobContext, data: DataResult, references: ReferencesResult) -> PilotResult:
    """Which distillation the ViTs train with and which patch embedding the supernet gets:
    ``--distill`` / ``--embed`` where given, else a short pilot that trains the space's smallest
    subnet from scratch once per choice on a slice of the budget (distillation modes with the patch
    embedding; the other embeddings with the distillation fixed, or none where it is piloted)."""
    c, split, teacher = ctx.config, data.load_split(), references.teacher
    modes = list(PILOT_MODES) if teacher is not None and c.distill == "auto" else []
    fixed = c.distill if c.distill != "auto" else "none"
    if teacher is None:
        fixed, why = "none", "no teacher (no reference and no --teacher)"
    else:
        why = f"set by --distill {c.distill}"
    embeds = list(PILOT_EMBEDS) if c.embed == "auto" else []
    # (key, distillation, embedding) of each pilot run
    runs = [(m, m, "patch") for m in modes] or ([(fixed, fixed, "patch")] if embeds else [])
    runs += [(e, runs[0][1], e) for e in embeds]
    embed = c.embed if c.embed != "auto" else "patch"
    embed_why = f"set by --embed {c.embed}" if c.embed != "auto" else "the default"
    if not runs:
        return PilotResult(fixed, why, {}, None, 0.0, embed, embed_why)
    share = ctx.budget.share("pilot")
    each = None if share is None else share / len(runs)

    def make():
        if each is None:
            return {"epochs": c.pilot_epochs, "fraction": 1.0}
        probe = build_model(_pilot_student(ctx, data.data, "hard", None, 1, 1.0, None), split.classes)
        sec, ips = ctx.epoch_seconds(probe, split)
        epochs, fraction = ctx.budget.fit("pilot", each, c.pilot_epochs, sec, fraction=True)
        return {"epochs": epochs, "fraction": fraction}

    plan = ctx.plan("pilot", make)
    got = {}
    for key, mode, emb in runs:
        tc = _pilot_student(ctx, data.data, mode, teacher, plan["epochs"], plan["fraction"], ctx.time_limit(each), emb)
        res = ctx.train_stage(ctx.run.stage_dir("pilot") / key, tc, split)
        got[key] = res.best_val.get(f"val_{references.metric}", 0.0)
    name, epochs = METRIC_NAMES[references.metric], plan["epochs"] * plan["fraction"]
    head = f"pilot: the smallest subnet, {epochs:.2g} epoch(s) per run, val {name} "
    scores = {k: got[k] for k in modes}
    mode = fixed
    if modes:
        mode, margin = pilot_choice(scores, len(split.val))
        why = (head + ", ".join(f"{m} {100 * v:.1f} %" for m, v in scores.items())
               + f"; distillation only where it beats none by more than {100 * margin:.1f} points")
        console.print(f"distillation: {mode} ({why})")
    embed_scores = {}
    if embeds:
        embed_scores = {"patch": got[runs[0][0]]} | {e: got[e] for e in embeds}
        embed, margin = pilot_choice(embed_scores, len(split.val), default="patch")
        embed_why = (head + ", ".join(f"{e} {100 * v:.1f} %" for e, v in embed_scores.items())
                     + f" ({runs[0][1]} distillation); another embedding only where it beats patch by more than "
                       f"{100 * margin:.1f} points")
        console.print(f"patch embedding: {embed} ({embed_why})")
    return PilotResult(mode, why, scores, "smallest subnet", epochs, embed, embed_why, embed_scores)


def pilot_choice(scores: dict[str, float], n_val: int, default: str = "none") -> tuple[str, float]:
    """(choice, margin): the best-scoring choice (the earlier of equals) only where it beats
    ``default`` by more than the noise of the validation split (two images, at least one point);
    else ``default``, the cheaper."""
    margin = max(0.01, 2 / max(n_val, 1))
    order = list(scores)
    best = max((k for k in order if k != default), key=lambda k: (scores[k], -order.index(k)))
    return (best if scores[best] - scores[default] > margin else default), margin


def _distill(pilot: PilotResult, references: ReferencesResult) -> dict:
    """The TrainConfig fields that make a run learn from the teacher as the pilot chose."""
    if pilot.mode == "none" or references.teacher is None:
        return {"teacher": None}
    return {"teacher": references.teacher, "distill": pilot.mode}


def stage_baseline(ctx: JobContext, data: DataResult) -> BaselineResult:
    """DeiT-B/16: at small scale trained from scratch for what its share buys (possibly part of an
    epoch: it is the speed reference, and far too slow here to train to convergence)."""
    c, split = ctx.config, data.load_split()
    folder = ctx.run.stage_dir("baseline")
    if c.baseline_weights:
        pretrained, start = False, f"--baseline-weights {c.baseline_weights}"
    else:
        pretrained, start = hub_weights(ctx, c.baseline_model, "baseline")

    def make():
        tc = c.train_config(data.data, model=c.baseline_model)  # random weights: only the speed is probed
        if ctx.budget.seconds is None:
            return {"epochs": c.baseline_epochs, "fraction": 1.0, "baseline_ips": None}
        sec, ips = ctx.epoch_seconds(build_model(tc, split.classes), split)
        share = ctx.budget.share("baseline")
        epochs, fraction = ctx.budget.fit("baseline", share, c.baseline_epochs, sec, fraction=True)
        return {"epochs": epochs, "fraction": fraction, "baseline_ips": ips, "share": share}

    plan = ctx.plan("baseline", make)
    e = plan["epochs"]
    tc = c.train_config(data.data, model=c.baseline_model, pretrained=pretrained, weights=c.baseline_weights,
                        epochs=e, epoch_fraction=plan.get("fraction", 1.0), warmup_epochs=min(2.0, e / 5),
                        lr=c.scale_settings["baseline_lr"], time_limit=ctx.time_limit(plan.get("share")))
    res = ctx.train_stage(folder, tc, split)
    best = str(res.run.find_checkpoint("best"))
    model = load_model(best)
    return BaselineResult(str(folder), best, e, res.best_val.get("val_top1"), count_params(model),
                          count_macs(model) / 1e9, plan["baseline_ips"], start)


def stage_supernet(ctx: JobContext, data: DataResult, references: ReferencesResult,
                   pilot: PilotResult) -> SupernetResult:
    c, split = ctx.config, data.load_split()
    base = c.train_config(data.data)
    kw = {k: getattr(base, k) for k in ("data", "img_size", "patch_size", "batch_size", "device", "drop_path")}
    kw |= c.data_settings()
    kw |= _distill(pilot, references)
    kw |= dict(embed=pilot.embed, supernet_weights=c.supernet_weights, select=c.select)
    init, start = c.supernet_start(), "random weights"
    if c.supernet_weights:
        start = f"the trained supernet {c.supernet_weights}"
    elif init is not None:
        ok, why = (True, init) if c.supernet_init is not None else hub_weights(ctx, init, "supernet")
        kw["supernet_init"], start = (init, f"weight selection ({c.select}) from {init}") if ok else (None, why)

    def make():
        net = build_supernet(SupernetConfig(space=c.space, **kw), split.classes, with_weights=False)
        net.set_arch(net.space.largest())
        return {"epochs": ctx.epochs_for("supernet", c.supernet_epochs, net, split, extra_per_image=_kd_cost(ctx, kw))[0]}

    e = ctx.plan("supernet", make)["epochs"]
    tc = SupernetConfig(space=c.space, epochs=e, warmup_epochs=min(2.0, e / 5),
                        time_limit=ctx.time_limit(ctx.budget.share("supernet")), **kw)
    res = ctx.train_stage(ctx.run.stage_dir("supernet"), tc, split, supernet=True)
    return SupernetResult(str(res.run.root), e, res.best_val.get("val_top1"), start, pilot.embed)


def _kd_cost(ctx: JobContext, distill: dict) -> float:
    """Seconds per training image the teacher's forward pass adds (measured once, kept in the plan)."""
    if not distill.get("teacher") or ctx.budget.seconds is None:
        return 0.0

    def make():
        teacher = load_model(distill["teacher"])
        return {"teacher_train_ips": probe_train_speed(teacher, 16, ctx.config.img_size, ctx.device, ctx.amp)}

    return 1 / (3 * ctx.plan("teacher", make)["teacher_train_ips"])  # a forward pass: ~1/3 of a training step


def stage_finetune(ctx: JobContext, data: DataResult, supernet: SupernetResult, search: SearchStageResult,
                   references: ReferencesResult, pilot: PilotResult) -> FinetuneResult:
    c, split = ctx.config, data.load_split()
    net, jobs = None, []  # (label, extracted checkpoint, arch)
    for k, t in enumerate(search.top, 1):
        extracted = ctx.run.stage_dir("finetune") / f"subnet-{k}-extracted"

        def extract(extracted=extracted, arch=t.arch):  # rank 0 writes; the others read it after
            nonlocal net
            if not (extracted / WEIGHTS_FILE).is_file():
                net = net or load_supernet(supernet.run)
                extract_to(net, arch, extracted, source=supernet.run)

        on_main(extract)
        jobs.append((f"subnet-{k}", extracted, t.arch.short()))
    distill = _distill(pilot, references)
    share = ctx.budget.share("finetune")

    def tc_for(extracted, epochs):
        return c.train_config(data.data, init_checkpoint=str(extracted), epochs=epochs, lr=3e-4,
                              warmup_epochs=min(1.0, epochs / 5), **distill,
                              time_limit=ctx.time_limit(None if share is None else share / len(jobs))).resolved()

    def make():
        model = build_model(tc_for(jobs[0][1], 1), split.classes)
        return {"epochs": ctx.epochs_for("finetune", c.finetune_epochs, model, split, parts=len(jobs),
                                         extra_per_image=_kd_cost(ctx, distill))[0]}

    e = ctx.plan("finetune", make)["epochs"]
    models = []
    for label, extracted, short in jobs:
        res = ctx.train_stage(ctx.run.stage_dir("finetune") / label, tc_for(extracted, e), split)
        models.append(FinetunedModel(label, str(res.run.find_checkpoint("best")), short, distill["teacher"],
                                     res.best_val.get("val_top1")))
    return FinetuneResult(e, models)


def stage_final(ctx: JobContext, data: DataResult, finetune: FinetuneResult, joint: JointResult,
                references: ReferencesResult, pilot: PilotResult) -> FinalResult:
    """The chosen configuration fine-tuned with its ToMe schedule on (and the teacher); kept only
    where validation says so; saved as chosen/ and evaluated once on the test split."""
    c, split, chosen = ctx.config, data.load_split(), joint.chosen
    distill = _distill(pilot, references)
    share = ctx.budget.share("final")

    def tc_for(epochs):
        return c.train_config(data.data, init_checkpoint=chosen.checkpoint, tome=chosen.tome, epochs=epochs, lr=1e-4,
                              warmup_epochs=0.0, time_limit=ctx.time_limit(share), **distill).resolved()

    def make():
        model = build_model(tc_for(1), split.classes)
        return {"epochs": ctx.epochs_for("final", c.final_epochs, model, split,
                                         extra_per_image=_kd_cost(ctx, distill))[0]}

    e = ctx.plan("final", make)["epochs"]
    res = ctx.train_stage(ctx.run.stage_dir("final"), tc_for(e), split)
    return on_main(lambda: _keep_and_test(ctx, data, joint, res.run, e))


def _keep_and_test(ctx: JobContext, data: DataResult, joint: JointResult, tuned_run, e: int) -> FinalResult:
    """The final fine-tune's outcome (rank 0): kept or not on validation, saved as chosen/, tested once."""
    c, split, chosen, metric = ctx.config, data.load_split(), joint.chosen, joint.metric
    best = tuned_run.find_checkpoint("best")
    p = Precision(chosen.precision)
    tuned = load_model(best)
    val = ctx.loader(split, "val", tuned.vitfab_meta.preprocess)
    calib = None if chosen.runtime == "torch" else image_batches(split.root, split.train, tuned.vitfab_meta.preprocess,
                                                                 CALIBRATION_IMAGES)
    work = ctx.run.stage_dir("final") / "artifacts"

    def deployed(m):  # validation and test run in the runtime and precision it is deployed with
        return in_runtime(m, chosen.runtime, p.value, ctx.device, work, calib)

    outputs = validation_outputs(deployed(tuned), val, ctx.device, p)
    tuned_val, fit = scores_of(*outputs)[metric], data.operating_fitter(c.ceilings())
    tuned_op = fit(*outputs) if fit is not None else None  # refitted: the weights changed
    # kept where validation is no worse, and its operating point still meets ceilings the choice met
    keep_tuned = tuned_val >= chosen.score(metric) and (tuned_op is None or tuned_op.met or not chosen.meets_ceilings)
    op = (None if tuned_op is None else tuned_op.to_dict()) if keep_tuned else chosen.operating
    source = best if keep_tuned else Path(chosen.checkpoint)
    model = apply_spec(load_model(source), chosen.tome)
    save_checkpoint(ctx.run.chosen, model, {"precision": chosen.precision, "runtime": chosen.runtime,
                                            "choice": chosen.to_dict(),
                                            "fine_tuned_with_tome": keep_tuned, "run": str(ctx.run.root)}
                    | ({"operating_point": op} if op else {}))
    test = ctx.loader(split, "test", model.vitfab_meta.preprocess)
    logits, targets = collect_logits(deployed(model), test, ctx.device, progress=ctx.progress,
                                     description="test (chosen)")
    m = classification_metrics(logits, targets, model.vitfab_meta.classes, c.good_class)
    if op:
        m["operating_point"] = operating_metrics(OperatingPoint.from_dict(op), logits, targets, data.classes)
    write_json_atomic(ctx.run.chosen / "test.json", m)
    plot_confusion(m, ctx.run.report_dir / "confusion_chosen.png",
                   f"chosen: {chosen.arch}, {chosen.tome or 'no ToMe'}, {chosen.precision}"
                   + ("" if chosen.runtime == "torch" else f", {chosen.runtime}") + " (test)")
    name = METRIC_NAMES[metric]
    console.print(f"final fine-tune ({e} epochs with {'ToMe ' + chosen.tome if chosen.tome else 'no ToMe'}): "
                  f"val {name} {100 * tuned_val:.2f} % vs {100 * chosen.score(metric):.2f} % off the shelf -> "
                  f"{'kept' if keep_tuned else 'not kept'}; test top-1 {100 * m['top1']:.2f} %, macro-F1 "
                  f"{m['macro_f1']:.3f}")
    return FinalResult(str(tuned_run.root), e, tuned_val, chosen.score(metric), keep_tuned, str(ctx.run.chosen),
                       chosen.checkpoint, TestMetrics.of(m), op)
