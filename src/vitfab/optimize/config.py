"""``JobConfig``: every setting of the main job (each field is also a ``vitfab run`` option), the
two scales' defaults, and the requirement the chosen model must meet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..data.split import DataSettings, Split
from ..errors import VitfabError
from ..evaluate.metrics import METRICS, good_classes
from ..evaluate.operating import DEFAULT_MAX_OVERKILL, Ceilings
from ..models import BASELINE
from ..models.embed import EMBEDS
from ..models.selection import METHODS
from ..nas.train import check_supernet_start
from ..options import option
from ..precision import Precision, parse_precision, useful_precisions, with_reference
from ..progress import console
from ..runtime import resolve_device
from ..runtimes import RUNTIMES
from ..tome import parse_tome_spec
from ..train import TrainConfig

SCALES: dict[str, dict[str, Any]] = {
    # small: minutes on a 2-core CPU (the default `make run`); full: the paper's setting, for a GPU
    # (batch 16 at small scale: ViTs trained from scratch on ~1,000 images need optimizer steps more than
    # large batches; DeiT-Tiny on the synthetic set: 47 % val top-1 after 5 epochs at batch 16, chance at 64)
    "small": dict(img_size=64, patch_size=8, batch_size=16, reference_epochs=40, pilot_epochs=3, baseline_epochs=16,
                  supernet_epochs=30, population=16,
                  generations=6, top_k=2, finetune_epochs=10, final_epochs=4, budget_minutes=10.0, pretrained=False,
                  baseline_lr=1e-4),
    "full": dict(img_size=224, patch_size=16, batch_size=64, reference_epochs=30, pilot_epochs=5, baseline_epochs=30,
                 supernet_epochs=100, population=50,
                 generations=20, top_k=3, finetune_epochs=30, final_epochs=10, budget_minutes=None, pretrained=True,
                 baseline_lr=None),
}
SCALE_FIELDS = ("img_size", "patch_size", "batch_size", "reference_epochs", "pilot_epochs", "baseline_epochs",
                "supernet_epochs", "finetune_epochs", "final_epochs", "top_k")
DISTILL = ("auto", "none", "soft", "hard")
JOB_EMBEDS = ("auto",) + EMBEDS
# --scale full: the pretrained ViT each named space's supernet is selected from (the smallest DeiT
# at least as wide as the space's largest subnet in every dimension)
INIT_SOURCES = {"tiny": "deit_small_patch16_224", "small": "deit_base_patch16_224", "base": "deit_base_patch16_224"}
REFERENCE_SHARE = 0.15  # of the budget, at least, for each reference


@dataclass
class Requirement:
    """What the chosen model must reach on validation, in the run's metric (``--metric``; by default
    top-1, or macro-F1 on imbalanced data): an absolute value, or at most ``max_drop`` points below the
    reference it is measured from (the best reference by default)."""

    min_accuracy: float | None = None  # fraction in [0, 1]
    max_drop: float | None = 1.0  # points

    def validate(self) -> None:
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise VitfabError(f"--min-accuracy must lie in [0, 1] (or 0-100 in percent), got {self.min_accuracy}")
        if self.max_drop is not None and self.max_drop < 0:
            raise VitfabError(f"--max-drop must be >= 0 points, got {self.max_drop}")

    def threshold(self, reference: float) -> float:
        if self.min_accuracy is not None:
            return self.min_accuracy
        return reference - (self.max_drop or 0.0) / 100

    def describe(self, reference: float | None = None, source: str = "the DeiT-B/16 baseline",
                 metric: str = "top-1") -> str:
        if self.min_accuracy is not None:
            return f"validation {metric} >= {100 * self.min_accuracy:.2f} %"
        text = f"validation {metric} at most {self.max_drop:g} points below {source}"
        if reference is not None:
            text += f" ({100 * reference:.2f} % -> >= {100 * self.threshold(reference):.2f} %)"
        return text


def passable_classes(split: Split, good_class: str | None, ceilings: Ceilings) -> list[str]:
    """The good classes an operating point is fitted on: none where the data have none, or where the
    validation split lacks good or defective images (said in a line; an error where ceilings ask
    for an operating point)."""
    good = good_classes(split.classes, good_class)
    ceilings.check(split.classes, good)
    counts = split.class_counts()["val"]
    n_good = sum(counts[split.classes[g]] for g in good)
    if good and (n_good == 0 or n_good == len(split.val)):
        why = (f"the validation split has {n_good} good and {len(split.val) - n_good} defective images: no operating "
               f"point can be fitted")
        if ceilings.active:
            raise VitfabError(f"{why}; give more images or a larger --val-fraction")
        console.print(f"[yellow]warning:[/yellow] {why}; escape and overkill are reported at the argmax only")
        return []
    return [split.classes[g] for g in good]


@dataclass
class JobConfig(DataSettings):
    data: str | None = option(None, help="ImageFolder dataset; default: synthesise the X-ray set.")
    scale: str = option("small", help="small (64 px, minutes on a CPU) or full (224 px, the paper's setting).")
    metric: str = option("auto", help="The accuracy metric of the requirement and of every selection: top1, macro_f1, "
                                      "balanced_accuracy, or auto (macro_f1 where the classes are imbalanced, else "
                                      "top1).")
    min_accuracy: float | None = option(None, help="Required validation value of --metric (0-1, or percent).")
    max_drop: float = option(1.0, help="Else: at most this many points below --requirement-from.")
    max_escape: float | None = option(None, help="Escape ceiling, percent: at most this share of the defective "
                                                 "validation images may pass at the model's calibrated operating "
                                                 "point.")
    max_overkill: float = option(DEFAULT_MAX_OVERKILL, help="Overkill ceiling, percent: at most this share of the "
                                                            "good validation images may be flagged.")
    min_recall: list[str] = option(default_factory=list, help="Recall floor CLASS=R of a defect class: at least R "
                                                              "(a fraction or percent) of its images flagged; "
                                                              "repeatable.")
    objective: str = option("throughput", help="What 'fastest' means: throughput, latency or energy.")
    device: str = option("auto", help="auto, cpu or cuda: where models train and are measured.")
    budget_minutes: float | None = option(None, help="Wall-clock budget; epochs and search size are scaled to fit "
                                                     "[default: 10 at small, none at full; 0 = none].")
    baseline_model: str = option(BASELINE, help="The reference ViT the speedups are measured against.")
    baseline_weights: str | None = option(None, help="Local baseline weights (instead of the hub at --scale full).")
    space: str = option("tiny", help="AutoFormer search space: tiny, small, base or a YAML file.")
    min_reduction: float = option(10.0, help="Search limit: params and GMACs at most the baseline's / this.")
    tome_grid: str = option("none,macs=0.75,macs=0.5,macs=0.35", help="ToMe schedules to try (comma list).")
    tome_search: bool = option(True, help="Also search a per-block ToMe schedule for each macs= target of the grid "
                                          "and each trained model (--no-tome-search: the grid alone).")
    precisions: str | None = option(None, help="Precision modes to try in PyTorch (default: those worth it here).")
    runtimes: str = option("auto", help="Deploy runtimes to search (comma list of torch, onnxruntime, openvino, "
                                        "tensorrt), or auto: every one that runs here. 'torch' alone: PyTorch eager "
                                        "only, no conversion.")
    references: str = option("resnet18,deit_tiny_patch16_224",
                             help="Models a user would otherwise train, trained on the same split as references (timm "
                                  "names, comma list; 'none' for none). Each gets at least the reference recipe and "
                                  "15 % of the budget; the best on validation teaches the ViTs.")
    requirement_from: str = option("best", help="What --max-drop is measured from: best (the best reference on "
                                                "validation), baseline (DeiT-B/16), or a reference's name.")
    teacher: str | None = option(None, help="Distil from this trained vitfab checkpoint instead of the best reference.")
    distill: str = option("auto", help="Distillation from the teacher in supernet training and every fine-tune: "
                                       "soft, hard, none, or auto (a short pilot on a slice of the budget picks one).")
    embed: str = option("auto", help="Patch embedding of the supernet and its subnets: patch, conv (a convolutional "
                                     "stem), spt (shifted patch tokens), or auto (the pilot tries each; another than "
                                     "patch only where it beats patch by more than the validation noise).")
    supernet_weights: str | None = option(None, help="Start the supernet from a trained one: a vitfab supernet "
                                                     "checkpoint or a file the AutoFormer authors released.")
    supernet_init: str | None = option(None, help="Start the supernet by weight selection from a pretrained ViT: a "
                                                  "timm name (hub weights), NAME=FILE or a vitfab checkpoint; 'none' "
                                                  "for random [default: none at small; at full DeiT-S for the tiny "
                                                  "space, DeiT-B else, where the hub is reachable].")
    select: str = option(METHODS[0], help="With a --supernet-init: uniform (evenly spaced channels, heads, units and "
                                         "layers; Xu et al. 2024) or leading (the first ones).")
    top_k: int | None = option(None, help="Subnets extracted and fine-tuned [default: 2 small, 3 full].")
    img_size: int | None = option(None, help="Input size [default: 64 small, 224 full].")
    patch_size: int | None = option(None, help="Patch size [default: 8 small, 16 full].")
    reference_epochs: int | None = option(None, help="Nominal epochs of each reference (before the budget).")
    pilot_epochs: int | None = option(None, help="Nominal epochs of each distillation pilot run (before the budget).")
    baseline_epochs: int | None = option(None, help="Nominal baseline epochs (before the budget).")
    supernet_epochs: int | None = option(None, help="Nominal supernet epochs (before the budget).")
    finetune_epochs: int | None = option(None, help="Nominal subnet fine-tune epochs (before the budget).")
    final_epochs: int | None = option(None, help="Nominal final fine-tune epochs (before the budget).")
    batch_size: int | None = option(None, help="Training batch size [default: 16 small, 64 full].")
    drop_path: float = option(0.1, help="Stochastic depth rate of every ViT the job trains (baseline, supernet, "
                                        "subnets, ViT references); 0 = off.")
    n_per_class: int = option(200, help="Synthetic images per class (no --data).")
    difficulty: float = option(0.5, help="Synthetic defect subtlety, 0..1 (no --data).")
    measure_seconds: float | None = option(None, help="Seconds per timed repeat [default: 0.5 with a budget, "
                                                      "else 1.0].")
    speed_at_224: bool = option(True, help="Also time the chosen architecture at 224 px against DeiT-B/16.")

    def resolved(self) -> "JobConfig":
        """Scale defaults filled in (what the run folder records)."""
        if self.scale not in SCALES:
            raise VitfabError(f"--scale must be small or full, got '{self.scale}'")
        d = SCALES[self.scale]
        changes = {k: d[k] for k in SCALE_FIELDS if getattr(self, k) is None}
        if self.budget_minutes is None:
            changes["budget_minutes"] = d["budget_minutes"]
        if self.min_accuracy is not None and self.min_accuracy > 1:
            changes["min_accuracy"] = self.min_accuracy / 100  # given in percent
        return dataclasses.replace(self, **changes)

    @property
    def scale_settings(self) -> dict[str, Any]:
        return SCALES[self.scale]

    def validate(self) -> None:
        self.requirement().validate()
        self.ceilings()
        checks = [
            (self.metric in ("auto",) + METRICS,
             f"--metric must be one of auto, {', '.join(METRICS)}, got '{self.metric}'"),
            (self.distill in DISTILL, f"--distill must be one of {', '.join(DISTILL)}, got '{self.distill}'"),
            (self.embed in JOB_EMBEDS, f"--embed must be one of {', '.join(JOB_EMBEDS)}, got '{self.embed}'"),
            (self.select in METHODS, f"--select must be one of {', '.join(METHODS)}, got '{self.select}'"),
            (not (self.supernet_weights and self.supernet_init not in (None, "none")),
             "give one start for the supernet: --supernet-weights or --supernet-init"),
            (self.min_reduction >= 1, f"--min-reduction must be >= 1, got {self.min_reduction}"),
            (self.budget_minutes is None or self.budget_minutes >= 0, "--budget-minutes must be >= 0"),
            (self.top_k is None or self.top_k >= 1, "--top-k must be at least 1"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1"),
            (0 <= self.drop_path < 1, f"--drop-path must lie in [0, 1), got {self.drop_path}"),
            (self.n_per_class >= 4, "--n-per-class must be at least 4 (train, val and test need images)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise VitfabError(msg)
        for spec in self.tome_grid.split(","):
            parse_tome_spec(spec)
        self.runtime_names()
        check_supernet_start(self.supernet_weights, self.supernet_init)
        self.precision_modes(torch.device("cpu") if self.device == "auto" else resolve_device(self.device))

    def supernet_start(self) -> str | None:
        """The ``--supernet-init`` this run asks for: given, 'none', or the scale's default source."""
        if self.supernet_init is not None:
            return None if self.supernet_init == "none" else self.supernet_init
        if self.supernet_weights or not self.scale_settings["pretrained"]:
            return None
        return INIT_SOURCES.get(self.space)

    def ceilings(self) -> Ceilings:
        """The escape and overkill ceilings and recall floors, as fractions."""
        return Ceilings.from_percent(self.max_escape, self.max_overkill, self.min_recall)

    def resolved_metric(self, imbalanced: bool) -> str:
        """--metric, with auto following the imbalance rule."""
        return self.metric if self.metric != "auto" else ("macro_f1" if imbalanced else "top1")

    def requirement(self) -> Requirement:
        return Requirement(self.min_accuracy, None if self.min_accuracy is not None else self.max_drop)

    def reference_names(self) -> list[str]:
        names = [n.strip() for n in self.references.split(",") if n.strip()]
        return [] if names in ([], ["none"]) else names

    def tome_schedules(self) -> list[str | None]:
        return [parse_tome_spec(s) for s in self.tome_grid.split(",") if s.strip()]

    def runtime_names(self) -> list[str]:
        """--runtimes as a list (auto: all of ``vitfab.runtimes.RUNTIMES``, those that cannot run here
        are left out with their reason by the joint search)."""
        names = [n.strip().lower() for n in self.runtimes.split(",") if n.strip()]
        if names in ([], ["auto"]):
            return list(RUNTIMES)
        bad = [n for n in names if n not in RUNTIMES]
        if bad:
            raise VitfabError(f"--runtimes takes auto or a comma list of {', '.join(RUNTIMES)}; got '{self.runtimes}'")
        return names

    def precision_modes(self, device: torch.device) -> list[Precision]:
        if self.precisions is None:
            return useful_precisions(device)
        return with_reference(parse_precision(p.strip(), allow_auto=False) for p in self.precisions.split(",")
                              if p.strip())

    def train_config(self, data: str, **kw) -> TrainConfig:
        """The training settings every stage shares (data, sizes, batch, seed, split), plus ``kw``."""
        tc = TrainConfig(data=data, img_size=self.img_size, patch_size=self.patch_size, batch_size=self.batch_size,
                         device=self.device, select_on=self.metric, drop_path=self.drop_path, **self.data_settings())
        return dataclasses.replace(tc, **kw)
