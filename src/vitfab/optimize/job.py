"""The main job, ``vitfab run``: from a folder of labelled images to the fastest ViT that meets
the accuracy requirement, with the evidence.

Stages (each writes into the run folder; ``state.json`` records the finished ones, so
``vitfab run --resume RUN`` skips them and continues an interrupted training where it stopped):

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
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.split import Split
from ..errors import VitfabError
from ..evaluate.metrics import classification_metrics
from ..evaluate.runner import CachedBatches, collect_logits, make_eval_loader, plot_confusion
from ..files import read_json, write_json_atomic
from ..measure.bench import DEFAULT_BATCH, apply_token_merging, parse_tome_spec
from ..measure.counts import count_macs, count_params
from ..models.checkpoint import load_model, read_meta, resolve_weights, save_checkpoint
from ..precision import Precision, parse_precision, prepare_model, useful_precisions, validation_accuracy
from ..progress import console
from ..rundir import RunDir
from ..runtime import resolve_amp, resolve_device
from ..train import TrainConfig
from ..train.config import checkpoint_model_args
from .budget import STAGES, Budget, epoch_seconds, probe_train_speed, search_size
from .joint import JointCandidate, Requirement, check_objective, choose, joint_front, joint_search

SCALES: dict[str, dict[str, Any]] = {
    # small: minutes on a 2-core CPU (the default `make run`); full: the paper's setting, for a GPU
    # (batch 16 at small scale: ViTs trained from scratch on ~1,000 images need optimizer steps more than
    # large batches; DeiT-Tiny on the synthetic set: 47 % val top-1 after 5 epochs at batch 16, chance at 64)
    "small": dict(img_size=64, patch_size=8, batch_size=16, baseline_epochs=16, supernet_epochs=30, population=16,
                  generations=6, top_k=2, finetune_epochs=10, final_epochs=4, budget_minutes=10.0, pretrained=False,
                  baseline_lr=1e-4),
    "full": dict(img_size=224, patch_size=16, batch_size=64, baseline_epochs=30, supernet_epochs=100, population=50,
                 generations=20, top_k=3, finetune_epochs=30, final_epochs=10, budget_minutes=None, pretrained=True,
                 baseline_lr=None),
}
DEFAULT_TOME_GRID = "none,macs=0.75,macs=0.5,macs=0.35"
BASELINE = "deit_base_patch16_224"


@dataclass
class JobConfig:
    data: str | None = None  # None: synthesise the X-ray package-defect set
    scale: str = "small"
    min_accuracy: float | None = None  # absolute validation top-1 (fraction); else max_drop applies
    max_drop: float = 1.0  # points below the baseline's validation top-1
    objective: str = "throughput"
    device: str = "auto"
    budget_minutes: float | None = None  # None: the scale's default; 0: no limit
    baseline_model: str = BASELINE
    baseline_weights: str | None = None  # local weights (full scale: instead of the hub)
    space: str = "tiny"
    min_reduction: float = 10.0  # search limits: params and GMACs at most the baseline's / this
    tome_grid: str = DEFAULT_TOME_GRID
    precisions: str | None = None  # comma list; None: the modes worth trying on the device
    distill: str = "none"  # none | soft | hard
    top_k: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    baseline_epochs: int | None = None
    supernet_epochs: int | None = None
    finetune_epochs: int | None = None
    final_epochs: int | None = None
    batch_size: int | None = None
    n_per_class: int = 200
    difficulty: float = 0.5
    seed: int = 0
    good_class: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_per_class: int | None = None
    skip_bad_images: bool = False
    measure_seconds: float | None = None  # seconds per timed repeat; None: 0.5 with a budget, else 1.0
    speed_at_224: bool = True  # also time the chosen architecture at 224 px against DeiT-B/16

    def resolved(self) -> "JobConfig":
        """Scale defaults filled in (what the run folder records)."""
        if self.scale not in SCALES:
            raise VitfabError(f"--scale must be small or full, got '{self.scale}'")
        d = SCALES[self.scale]
        changes = {k: d[k] for k in ("img_size", "patch_size", "batch_size", "baseline_epochs", "supernet_epochs",
                                     "finetune_epochs", "final_epochs", "top_k") if getattr(self, k) is None}
        if self.budget_minutes is None:
            changes["budget_minutes"] = d["budget_minutes"]
        if self.min_accuracy is not None and self.min_accuracy > 1:
            changes["min_accuracy"] = self.min_accuracy / 100  # given in percent
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        self.requirement().validate()
        checks = [
            (self.distill in ("none", "soft", "hard"), f"--distill must be none, soft or hard, got '{self.distill}'"),
            (self.min_reduction >= 1, f"--min-reduction must be >= 1, got {self.min_reduction}"),
            (self.budget_minutes is None or self.budget_minutes >= 0, "--budget-minutes must be >= 0"),
            (self.top_k is None or self.top_k >= 1, "--top-k must be at least 1"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.n_per_class >= 4, "--n-per-class must be at least 4 (train, val and test need images)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise VitfabError(msg)
        for spec in self.tome_grid.split(","):
            parse_tome_spec(spec)
        self.precision_modes(torch.device("cpu") if self.device == "auto" else resolve_device(self.device))

    def requirement(self) -> Requirement:
        return Requirement(self.min_accuracy, None if self.min_accuracy is not None else self.max_drop)

    def tome_schedules(self) -> list[str | None]:
        return [parse_tome_spec(s) for s in self.tome_grid.split(",") if s.strip()]

    def precision_modes(self, device: torch.device) -> list[Precision]:
        if self.precisions is None:
            return useful_precisions(device)
        modes = [parse_precision(p.strip(), allow_auto=False) for p in self.precisions.split(",") if p.strip()]
        if Precision.FP32 not in modes:
            modes.insert(0, Precision.FP32)  # the reference is always measured
        return modes

    def train_config(self, data: str, **kw) -> TrainConfig:
        tc = TrainConfig(data=data, img_size=self.img_size, patch_size=self.patch_size, batch_size=self.batch_size,
                         seed=self.seed, device=self.device, val_fraction=self.val_fraction,
                         test_fraction=self.test_fraction, max_per_class=self.max_per_class,
                         skip_bad_images=self.skip_bad_images, good_class=self.good_class)
        return dataclasses.replace(tc, **kw)


class JointOptimizer:
    """The stages of the main job over one run folder (see the module doc)."""

    def __init__(self, run: RunDir, config: JobConfig, split: Split | None, progress: bool = True):
        self.run, self.config, self.split, self.progress = run, config, split, progress
        self.device = resolve_device(config.device)
        self.amp = resolve_amp("auto", self.device)
        self.state_path = run.root / "state.json"
        self.state = read_json(self.state_path) if self.state_path.is_file() else {"stages": {}, "plans": {}}
        budget = config.budget_minutes
        self.budget = Budget.from_dict(self.state["budget"]) if "budget" in self.state else \
            Budget(budget * 60 if budget else None)

    # ------------------------------------------------------------------ bookkeeping
    def save_state(self) -> None:
        self.state["budget"] = self.budget.to_dict()
        write_json_atomic(self.state_path, self.state)

    def result(self, stage: str) -> dict[str, Any]:
        return self.state["stages"][stage]

    def plan(self, stage: str, make) -> dict[str, Any]:
        """A stage's settings, fixed when it first starts (a resumed stage keeps them)."""
        if stage not in self.state["plans"]:
            self.state["plans"][stage] = make()
            self.save_state()
        return self.state["plans"][stage]

    def run_all(self) -> dict[str, Any]:
        for i, stage in enumerate(STAGES, 1):
            if stage in self.state["stages"]:
                continue
            share = self.budget.share(stage)
            console.print(f"[bold]stage {i}/{len(STAGES)}: {stage}[/bold]"
                          + (f" (budget about {share:.0f} s)" if share is not None else ""))
            t0 = time.perf_counter()
            out = getattr(self, f"stage_{stage}")()
            seconds = time.perf_counter() - t0
            self.state["stages"][stage] = out | {"seconds": round(seconds, 1)}
            self.budget.finish(stage, seconds)
            self.save_state()
        return self.state

    def loader(self, subset: str, pre) -> CachedBatches:
        return CachedBatches(make_eval_loader(self.split.root, self.split.subset(subset), pre, 64))

    def epochs_for(self, stage: str, nominal: int, model: torch.nn.Module, parts: int = 1,
                   extra_per_image: float = 0.0) -> tuple[int, float | None]:
        """Epochs that fit the stage's share, from a measured training speed; and that speed
        (img/s; None without a budget, where nothing is probed)."""
        if self.budget.seconds is None:
            return nominal, None
        ips = probe_train_speed(model, min(self.config.batch_size, 16), self.config.img_size, self.device, self.amp)
        per = 1 / ips + extra_per_image
        sec = epoch_seconds(len(self.split.train), len(self.split.val), 1 / per)
        return self.budget.epochs(stage, nominal, sec, parts), ips

    def train_stage(self, folder: Path, tc: TrainConfig, trainer: str = "train"):
        """Train into ``folder``, or continue it where an interrupted job left it."""
        from ..nas.train import resume_supernet, train_supernet
        from ..train import resume, train

        if (folder / "config.json").is_file():
            console.print(f"continuing {folder}")
            return resume_supernet(folder, self.progress) if trainer == "supernet" else resume(folder, self.progress)
        if trainer == "supernet":
            return train_supernet(tc, folder, self.progress, split=self.split)
        return train(tc, folder, self.progress, split=self.split)

    # ------------------------------------------------------------------ stages
    def stage_data(self) -> dict[str, Any]:
        from ..train.loop import prepare_split

        c = self.config
        data = c.data
        if data is None:
            from ..data.synth import SynthConfig, synthesize
            from ..progress import task

            data = str(self.run.root / "data")
            if Path(data).exists():  # a synthesis cut short by a kill: the job's own folder, made anew
                shutil.rmtree(data)
            synth = SynthConfig(n_per_class=c.n_per_class, img_size=c.img_size, seed=c.seed, difficulty=c.difficulty)
            with task("synthesising X-ray set", total=7 * c.n_per_class, enabled=self.progress) as adv:
                meta = synthesize(data, synth, on_progress=adv)
            console.print(f"synthetic data: {c.n_per_class} images per class at {c.img_size} px in "
                          f"{meta['seconds']:.1f} s -> {data}")
        if self.split is None:
            self.split = prepare_split(c.train_config(data), self.progress)
        self.split.save(self.run.split_path)
        s = self.split
        return {"data": data, "synthetic": c.data is None, "classes": s.classes,
                "images": {"train": len(s.train), "val": len(s.val), "test": len(s.test)}}

    def stage_baseline(self) -> dict[str, Any]:
        from ..train.loop import build_model

        c = self.config
        folder = self.run.root / "baseline"
        pretrained = SCALES[c.scale]["pretrained"] and not c.baseline_weights

        def make():
            tc = c.train_config(self.data, model=c.baseline_model)  # random weights: only the speed is probed
            epochs, ips = self.epochs_for("baseline", c.baseline_epochs, build_model(tc, self.split.classes))
            return {"epochs": epochs, "baseline_ips": ips}

        e = self.plan("baseline", make)["epochs"]
        tc = c.train_config(self.data, model=c.baseline_model, pretrained=pretrained, weights=c.baseline_weights,
                            epochs=e, warmup_epochs=min(2.0, e / 5), lr=SCALES[c.scale]["baseline_lr"])
        res = self.train_stage(folder, tc)
        best = str(res.run.find_checkpoint("best"))
        model = load_model(best)
        return {"run": str(folder), "checkpoint": best, "epochs": e, "val_top1_training": res.best_val.get("val_top1"),
                "params": count_params(model), "gmacs": count_macs(model) / 1e9}

    def stage_supernet(self) -> dict[str, Any]:
        from ..nas.train import SupernetConfig, build_supernet

        c = self.config
        base = c.train_config(self.data)
        kw = {k: getattr(base, k) for k in ("data", "img_size", "patch_size", "batch_size", "seed", "device",
                                             "val_fraction", "test_fraction", "max_per_class", "skip_bad_images",
                                             "good_class")}

        def make():
            net = build_supernet(SupernetConfig(space=c.space, **kw), self.split.classes, with_weights=False)
            net.set_arch(net.space.largest())
            return {"epochs": self.epochs_for("supernet", c.supernet_epochs, net)[0]}

        e = self.plan("supernet", make)["epochs"]
        res = self.train_stage(self.run.root / "supernet", SupernetConfig(space=c.space, epochs=e,
                                                                          warmup_epochs=min(2.0, e / 5), **kw),
                               "supernet")
        return {"run": str(res.run.root), "epochs": e, "val_top1_training": res.best_val.get("val_top1")}

    def stage_search(self) -> dict[str, Any]:
        from ..nas.search import EvolutionarySearch, Limits, SearchConfig
        from ..nas.train import load_supernet

        c, scale = self.config, SCALES[self.config.scale]
        net = load_supernet(self.result("supernet")["run"], self.device)
        val = self.loader("val", net.vitfab_meta.preprocess)
        base = self.result("baseline")
        limits = Limits(max_params=base["params"] / c.min_reduction, max_gmacs=base["gmacs"] / c.min_reduction)

        def make():
            mid = net.space.sample(random.Random(c.seed))
            t0 = time.perf_counter()
            EvolutionarySearch(net, val, self.device, limits, SearchConfig(), self.run.root / "search",
                               False).accuracy(mid)
            per = time.perf_counter() - t0
            pop, gens = search_size(self.budget.share("search"), per, scale["population"], scale["generations"],
                                    self.budget)
            return {"population": pop, "generations": gens}

        p = self.plan("search", make)
        pop, gens = p["population"], p["generations"]
        cfg = SearchConfig(population=pop, generations=gens, parents=max(2, pop // 4), mutations=pop // 2,
                           crossovers=pop // 2, seed=c.seed)
        res = EvolutionarySearch(net, val, self.device, limits, cfg, self.run.root / "search", self.progress).run()
        top = res.ranked[: c.top_k]
        return {"out": str(res.out), "limits": limits.describe(), "population": pop, "generations": gens,
                "evaluated": res.evaluated,
                "top": [{"arch": t.arch.to_dict(), "short": t.arch.short(), "supernet_val_top1": t.accuracy,
                         "params": t.params, "gmacs": t.gmacs} for t in top]}

    def stage_finetune(self) -> dict[str, Any]:
        from ..models.arch import ArchConfig
        from ..nas.extract import extract_to
        from ..nas.train import load_supernet
        from ..train.loop import build_model

        c = self.config
        top = self.result("search")["top"]
        net = None
        jobs = []  # (label, extracted checkpoint, arch, teacher)
        for k, t in enumerate(top, 1):
            extracted = self.run.root / "finetune" / f"subnet-{k}-extracted"
            if not (extracted / "model.safetensors").is_file():
                net = net or load_supernet(self.result("supernet")["run"])
                extract_to(net, ArchConfig.from_dict(t["arch"]), extracted, source=self.result("supernet")["run"])
            jobs.append((f"subnet-{k}", extracted, t["short"], None))
        if c.distill != "none":
            jobs.append(("subnet-1-kd", jobs[0][1], jobs[0][2], self.result("baseline")["checkpoint"]))

        def tc_for(extracted, teacher, epochs):
            return c.train_config(self.data, **checkpoint_model_args(extracted), epochs=epochs, lr=3e-4,
                                  warmup_epochs=min(1.0, epochs / 5), teacher=teacher,
                                  distill=c.distill if teacher else "soft")

        def make():
            model = build_model(tc_for(jobs[0][1], None, 1), self.split.classes)
            kd_cost = 0.0
            baseline_ips = self.state["plans"]["baseline"].get("baseline_ips")
            if c.distill != "none" and baseline_ips:  # the teacher's forward pass, ~1/3 of its training step
                kd_cost = 1 / (3 * baseline_ips) / len(jobs)
            return {"epochs": self.epochs_for("finetune", c.finetune_epochs, model, parts=len(jobs),
                                              extra_per_image=kd_cost)[0]}

        e = self.plan("finetune", make)["epochs"]
        models = []
        for label, extracted, short, teacher in jobs:
            res = self.train_stage(self.run.root / "finetune" / label, tc_for(extracted, teacher, e))
            models.append({"label": label, "checkpoint": str(res.run.find_checkpoint("best")), "arch": short,
                           "distilled": teacher is not None, "val_top1_training": res.best_val.get("val_top1")})
        return {"epochs": e, "models": models}

    def stage_joint(self) -> dict[str, Any]:
        c = self.config
        base_model = load_model(self.result("baseline")["checkpoint"])
        val = self.loader("val", base_model.vitfab_meta.preprocess)
        base_acc = validation_accuracy(prepare_model(base_model, Precision.FP32, self.device), val, self.device,
                                       Precision.FP32)
        del base_model
        threshold = c.requirement().threshold(base_acc)
        models = [(m["label"], m["checkpoint"], m["arch"]) for m in self.result("finetune")["models"]]
        modes = c.precision_modes(self.device)
        cands = joint_search(models, c.tome_schedules(), modes, val, self.device, c.objective,
                             batch_size=DEFAULT_BATCH.get(self.device.type, 16), progress=self.progress,
                             min_repeat_seconds=min(0.25, c.measure_seconds or 0.25))
        chosen, met = choose(cands, threshold, c.objective)
        chance = 1 / len(self.split.classes)
        warning = None
        if base_acc < chance + 0.1 * (1 - chance):  # within a tenth of the way from chance to perfect
            warning = (f"the baseline is close to chance ({100 * base_acc:.1f} % vs {100 * chance:.1f} %): "
                       f"{self.result('baseline')['epochs']} epoch(s) of DeiT-B/16 fit this budget, so the requirement "
                       f"relative to it is weak; give more --budget-minutes, --baseline-weights, or --min-accuracy")
            console.print(f"[yellow]warning:[/yellow] {warning}")
        front = joint_front(cands, c.objective)
        out = self.run.root / "joint"
        out.mkdir(exist_ok=True)
        write_json_atomic(out / "candidates.json", [x.to_dict() for x in cands])
        console.print(f"joint search: {len(cands)} configurations, {len(front)} on the Pareto front; chosen "
                      f"{chosen.key} (val top-1 {100 * chosen.accuracy:.2f} %, {chosen.img_per_s:.0f} img/s)"
                      + ("" if met else " -- NO candidate meets the requirement: the most accurate is kept"))
        return {"baseline_val_top1": base_acc, "baseline_warning": warning, "threshold": threshold,
                "requirement": c.requirement().describe(base_acc), "requirement_met": met, "objective": c.objective, "precisions": [m.value for m in modes],
                "schedules": c.tome_schedules(), "chosen": chosen.to_dict(), "front": [x.key for x in front],
                "candidates": str(out / "candidates.json")}

    def stage_final(self) -> dict[str, Any]:
        from ..train.loop import build_model

        c = self.config
        chosen = JointCandidate.from_dict(self.result("joint")["chosen"])
        teacher = self.result("baseline")["checkpoint"] if "-kd" in chosen.model else None

        def tc_for(epochs):
            return c.train_config(self.data, **checkpoint_model_args(chosen.checkpoint), tome=chosen.tome,
                                  epochs=epochs, lr=1e-4, warmup_epochs=0.0, teacher=teacher,
                                  distill=c.distill if teacher else "soft")

        def make():
            return {"epochs": self.epochs_for("final", c.final_epochs, build_model(tc_for(1), self.split.classes))[0]}

        e = self.plan("final", make)["epochs"]
        res = self.train_stage(self.run.root / "final", tc_for(e))
        tuned = load_model(res.run.find_checkpoint("best"))
        val = self.loader("val", tuned.vitfab_meta.preprocess)
        p = Precision(chosen.precision)
        tuned_acc = validation_accuracy(prepare_model(tuned, p, self.device), val, self.device, p)
        keep_tuned = tuned_acc >= chosen.accuracy
        source = res.run.find_checkpoint("best") if keep_tuned else Path(chosen.checkpoint)
        model = apply_token_merging(load_model(source), chosen.tome)
        folder = self.run.root / "chosen"
        save_checkpoint(folder, model, {"precision": chosen.precision, "choice": chosen.to_dict(),
                                        "fine_tuned_with_tome": keep_tuned, "run": str(self.run.root)})
        test = self.loader("test", model.vitfab_meta.preprocess)
        logits, targets = collect_logits(prepare_model(model, p, self.device), test, self.device,
                                         progress=self.progress, description="test (chosen)")
        m = classification_metrics(logits, targets, model.vitfab_meta.classes, c.good_class)
        write_json_atomic(folder / "test.json", m)
        plot_confusion(m, self.run.root / "report" / "confusion_chosen.png",
                       f"chosen: {chosen.arch}, {chosen.tome or 'no ToMe'}, {chosen.precision} (test)")
        console.print(f"final fine-tune ({e} epochs with {'ToMe ' + chosen.tome if chosen.tome else 'no ToMe'}): "
                      f"val top-1 {100 * tuned_acc:.2f} % vs {100 * chosen.accuracy:.2f} % off the shelf -> "
                      f"{'kept' if keep_tuned else 'not kept'}; test top-1 {100 * m['top1']:.2f} %")
        return {"run": str(res.run.root), "epochs": e, "val_top1_tuned": tuned_acc,
                "val_top1_off_the_shelf": chosen.accuracy, "kept_tuned": keep_tuned, "checkpoint": str(folder),
                "subnet_checkpoint": chosen.checkpoint, "test": {k: m.get(k) for k in (
                    "top1", "macro_f1", "escape_rate", "overkill_rate")}}

    def stage_export(self) -> dict[str, Any]:
        """The chosen model as deploy/ (safetensors, TorchScript, ONNX with ToMe inside), checked
        against PyTorch fp32 in ONNX Runtime."""
        from ..export import export_deploy

        try:
            info = export_deploy(self.result("final")["checkpoint"], self.run.root / "deploy")
        except VitfabError as exc:  # the chosen checkpoint stands; the report says why there is no deploy/
            console.print(f"[yellow]warning:[/yellow] export failed: {exc}")
            return {"folder": None, "error": str(exc), "parity_max_abs_diff": {}}
        console.print("deploy/: " + ", ".join(f"{k} max |logit difference| {v:.1e}"
                                              for k, v in info["parity_max_abs_diff"].items()))
        return {"folder": str(self.run.root / "deploy"), "parity_max_abs_diff": info["parity_max_abs_diff"]}

    def stage_ablation(self) -> dict[str, Any]:
        from .ablation import ablation_rows, measure_ablation

        c = self.config
        chosen = JointCandidate.from_dict(self.result("joint")["chosen"])
        final = self.result("final")
        default_tome = next((s for s in c.tome_schedules() if s), "macs=0.5")
        if "macs=0.5" in c.tome_schedules():
            default_tome = "macs=0.5"
        subnet = final["subnet_checkpoint"] if chosen.tome else final["checkpoint"]
        rows = ablation_rows(self.result("baseline")["checkpoint"], subnet, final["checkpoint"], chosen.tome,
                             chosen.precision, c.precision_modes(self.device), self.device, default_tome,
                             self.baseline_name)
        test = self.loader("test", read_meta(resolve_weights(Path(final["checkpoint"]))).preprocess)
        small = self.budget.seconds is not None
        seconds = c.measure_seconds if c.measure_seconds is not None else (0.5 if small else 1.0)
        records = measure_ablation(rows, test, self.device, c.good_class, repeats=3 if small else 5,
                                   min_repeat_seconds=seconds, latency_runs=20 if small else 50,
                                   progress=self.progress)
        at224 = self.speed_at_224(chosen, seconds) if c.img_size != 224 and c.speed_at_224 else None
        write_json_atomic(self.run.root / "report" / "ablation.json", records)
        return {"rows": records, "at_224": at224, "default_tome": default_tome}

    @property
    def baseline_name(self) -> str:
        name = self.config.baseline_model
        return "DeiT-B/16 baseline" if name == BASELINE else f"{name} baseline"

    def speed_at_224(self, chosen: JointCandidate, seconds: float) -> dict[str, Any]:
        """The chosen architecture, schedule and precision at 224 px / patch 16 (random weights)
        against DeiT-B/16 fp32: speed does not depend on the weights, accuracy is not claimed."""
        from ..measure.bench import BenchConfig, benchmark
        from ..models import create_model

        arch = checkpoint_model_args(chosen.checkpoint)  # the architecture alone, not its weights
        m = create_model(arch["model"], classes=self.split.classes, img_size=224, patch_size=16, **arch["model_args"])
        folder = self.run.root / "ablation" / "chosen-arch-224"
        save_checkpoint(folder, m, {"note": "random weights; for speed only"})
        cfgs = [BenchConfig(model=BASELINE, img_size=224, label="DeiT-B/16 fp32 @224"),
                BenchConfig(checkpoint=str(folder), precision=chosen.precision, tome_r=chosen.tome,
                            label=f"chosen @224 ({chosen.arch}, {chosen.tome or 'no ToMe'}, {chosen.precision})")]
        ms = benchmark(cfgs, self.device, repeats=3, min_repeat_seconds=seconds, latency_runs=10, energy=False,
                       progress=self.progress)
        return {"rows": [{"name": x.label, "params": x.params, "gmacs": round(x.gmacs, 4),
                          "img_per_s": round(x.img_per_s, 2), "latency_ms_p50": round(x.latency_ms["p50"], 3),
                          "batch_size": x.batch_size} for x in ms],
                "speedup": round(ms[1].img_per_s / ms[0].img_per_s, 2),
                "params_reduction": round(ms[0].params / ms[1].params, 2),
                "macs_reduction": round(ms[0].macs / ms[1].macs, 2)}

    def stage_report(self) -> dict[str, Any]:
        from ..report import write_report

        files = write_report(self.run.root, self.summary(), self.progress)
        return {"files": [str(f) for f in files]}

    # ------------------------------------------------------------------ the summary
    @property
    def data(self) -> str:
        return self.result("data")["data"]

    def summary(self) -> dict[str, Any]:
        """summary.json: what a machine reads from the run."""
        from ..measure.measurement import device_name

        st = self.state["stages"]
        rows = st["ablation"]["rows"] if "ablation" in st else []
        keep = ("name", "axes", "chosen", "tome", "precision", "accuracy", "macro_f1", "escape_rate", "overkill_rate",
                "escape_note", "params", "gmacs", "img_per_s", "speedup", "latency_ms_p50", "latency_ms_p99",
                "joules_per_img", "energy_note", "peak_memory_mb", "r_per_layer", "batch_size", "img_size")
        slim = [{k: r.get(k) for k in keep if k in r} for r in rows]
        joint = st.get("joint", {})
        return {
            "run": str(self.run.root),
            "device": {"type": self.device.type, "name": device_name(self.device), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "train_amp": self.amp},
            "config": asdict(self.config),
            "requirement": joint.get("requirement"), "requirement_met": joint.get("requirement_met"),
            "objective": self.config.objective,
            "chosen": {**({k: joint["chosen"][k] for k in ("model", "arch", "tome", "precision", "r_per_layer",
                                                            "params", "gmacs")} if joint else {}),
                       "checkpoint": st.get("final", {}).get("checkpoint"), "test": st.get("final", {}).get("test"),
                       "val_top1": (st.get("final", {}).get("val_top1_tuned") if st.get("final", {}).get("kept_tuned")
                                    else joint.get("chosen", {}).get("accuracy"))},
            "baseline": slim[0] if slim else None,
            "ablation": slim,
            "at_224": st.get("ablation", {}).get("at_224"),
            "deploy": st.get("export"),
            "budget": self.budget.to_dict(),
            "stages": {k: v.get("seconds") for k, v in st.items()},
            "stage_results": {k: {kk: vv for kk, vv in v.items() if kk not in ("rows",)} for k, v in st.items()},
        }


def check_job(config: JobConfig) -> tuple[JobConfig, Split | None]:
    """Every check before the run folder is made: settings, device, objective, data and split."""
    from ..models.factory import check_model_name
    from ..train.loop import check_config, prepare_split

    config = config.resolved()
    config.validate()
    device = resolve_device(config.device)
    check_objective(config.objective, device)
    check_model_name(config.baseline_model)
    if config.baseline_weights and not Path(config.baseline_weights).is_file():
        raise VitfabError(f"--baseline-weights not found: {config.baseline_weights}")
    from ..evaluate.metrics import find_good_class
    from ..precision.modes import check_supported

    for mode in config.precision_modes(device):
        check_supported(mode, device)
    check_space(config)
    split = None
    if config.data is not None:
        tc = config.train_config(config.data)
        check_config(tc)
        split = prepare_split(tc, True)
        find_good_class(split.classes, config.good_class)
    else:
        from ..data.synth import CLASSES

        find_good_class(CLASSES, config.good_class)
    return config, split


def check_space(config: JobConfig) -> None:
    """The search limits (the baseline's params and GMACs / --min-reduction) must admit the
    space's smallest subnet: found out now, not after the baseline and the supernet trained."""
    from ..models.arch import SearchSpace, arch_macs, arch_params
    from ..models.factory import create_model

    space = SearchSpace.load(config.space, config.img_size, config.patch_size)
    base = create_model(config.baseline_model, num_classes=2, img_size=config.img_size, patch_size=config.patch_size)
    b_params, b_macs = count_params(base), count_macs(base)
    small = space.smallest()
    s_params = arch_params(small, 2, space.img_size, space.patch_size, space.head_dim)
    s_macs = arch_macs(small, space.img_size, space.patch_size, space.head_dim, 2)
    if s_params > b_params / config.min_reduction or s_macs > b_macs / config.min_reduction:
        raise VitfabError(f"--space {config.space}: its smallest subnet ({s_params / 1e6:.2f}M params, "
                          f"{s_macs / 1e9:.3f} GMACs) is not {config.min_reduction:g}x below the baseline "
                          f"({b_params / 1e6:.2f}M, {b_macs / 1e9:.3f} GMACs); lower --min-reduction or use a "
                          f"smaller space")


def run_job(config: JobConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """A new main job (see the module doc); returns the summary."""
    config, split = check_job(config)
    run = RunDir.create(Path(out).resolve() if out is not None else None, prefix="run")
    run.write_config({"kind": "main", "status": "running", "job": asdict(config)})
    console.print(f"run folder: {run.root}")
    return _finish(JointOptimizer(run, config, split, progress))


def resume_job(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Continue a main job after an interruption: finished stages are kept, the one in progress
    continues (training after its last complete epoch, the search after its last generation)."""
    run = RunDir.open(run_dir)
    cfg = run.read_config()
    if cfg.get("kind") != "main" or "job" not in cfg:
        raise VitfabError(f"{run.root} is not a main-job run folder (vitfab run)")
    config = JobConfig(**cfg["job"])
    split = Split.load(run.split_path) if run.split_path.is_file() else None
    return _finish(JointOptimizer(run, config, split, progress))


def _finish(job: JointOptimizer) -> dict[str, Any]:
    t0 = time.perf_counter()
    job.run_all()
    summary = job.summary()
    summary["wall_seconds_this_call"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(job.run.root / "summary.json", summary)
    cfg = job.run.read_config()
    cfg["status"] = "done"
    job.run.write_config(cfg)
    return summary
