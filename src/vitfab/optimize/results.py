"""What each stage of the main job returns: frozen dataclasses, saved to and read from state.json.

A later stage receives the results it needs as typed arguments (see ``stages.PIPELINE``); no
stage reads another's output by string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..data.split import Split
from ..evaluate.operating import Ceilings, OperatingPoint, fit_operating_point
from ..files import read_json
from ..models.arch import ArchConfig
from ..report.summary import AblationRecord, At224, DeployInfo, QualityInfo, TestMetrics
from .joint import JointCandidate


@dataclass(frozen=True)
class DataResult:
    data: str  # the image folder every stage reads (the user's, or the synthetic set in the run)
    synthetic: bool
    classes: list[str]
    images: dict[str, int]  # train / val / test
    split_file: str
    metric: str = "top1"  # what the requirement and every selection compare (--metric, auto resolved)
    good_classes: list[str] = field(default_factory=list)  # the classes whose images may pass

    def load_split(self) -> Split:
        return Split.load(self.split_file)

    def operating_fitter(self, ceilings: Ceilings) -> Callable[[np.ndarray, np.ndarray], OperatingPoint] | None:
        """``(logits, targets) -> OperatingPoint`` fitted to ``ceilings`` on the run's classes
        (validation), or None where no class may pass."""
        if not self.good_classes:
            return None
        good = [self.classes.index(g) for g in self.good_classes]
        return lambda logits, targets: fit_operating_point(logits, targets, self.classes, good, ceilings)


@dataclass(frozen=True)
class ReferenceModel:
    """A model a user would otherwise train (a timm CNN, DeiT-Tiny, ...), trained on the run's split."""

    name: str  # timm name
    label: str
    run: str
    checkpoint: str
    epochs: int
    seconds: float  # the wall time its training took
    budget_seconds: float | None  # what the budget gave it (at least 15 % of the whole)
    val_top1: float
    val_macro_f1: float
    start: str = "random weights"  # what its training started from
    val_balanced_accuracy: float = 0.0

    def score(self, metric: str) -> float:
        return {"top1": self.val_top1, "macro_f1": self.val_macro_f1,
                "balanced_accuracy": self.val_balanced_accuracy}[metric]


@dataclass(frozen=True)
class ReferencesResult:
    models: list[ReferenceModel]
    metric: str  # the run's metric (DataResult.metric)
    best: str | None  # label of the best reference on validation
    teacher: str | None  # the checkpoint the ViTs learn from (the best reference, or --teacher)
    teacher_label: str | None

    def model(self, name_or_label: str) -> ReferenceModel | None:
        return next((m for m in self.models if name_or_label in (m.name, m.label)), None)


@dataclass(frozen=True)
class PilotResult:
    """The distillation settings every later training stage uses, and why."""

    mode: str  # none | soft | hard
    reason: str
    scores: dict[str, float]  # validation metric of each mode the pilot tried
    arch: str | None  # the pilot's student
    epochs: float  # per pilot run (a fraction where the slice is shorter than an epoch)
    embed: str = "patch"  # the supernet's patch embedding (models.embed)
    embed_reason: str = "the default"
    embed_scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineResult:
    run: str
    checkpoint: str
    epochs: int
    val_top1_training: float | None
    params: int
    gmacs: float
    train_img_per_s: float | None  # the probed training speed (None without a budget)
    start: str = "random weights"  # what its training started from


@dataclass(frozen=True)
class SupernetResult:
    run: str
    epochs: int
    val_top1_training: float | None
    start: str = "random weights"  # what its training started from
    embed: str = "patch"


@dataclass(frozen=True)
class SearchedArch:
    arch: ArchConfig
    supernet_val_top1: float
    params: int
    gmacs: float


@dataclass(frozen=True)
class SearchStageResult:
    out: str
    limits: str
    population: int
    generations: int
    evaluated: int
    top: list[SearchedArch]


@dataclass(frozen=True)
class FinetunedModel:
    label: str
    checkpoint: str
    arch: str
    teacher: str | None  # the checkpoint it was distilled from; None: labels only
    val_top1_training: float | None


@dataclass(frozen=True)
class FinetuneResult:
    epochs: int
    models: list[FinetunedModel]

    def model(self, label: str) -> FinetunedModel:
        return next(m for m in self.models if m.label == label)


@dataclass(frozen=True)
class JointResult:
    metric: str  # what the requirement and the choice compare (DataResult.metric)
    baseline_val: float  # the DeiT-B/16 baseline's validation value of that metric
    reference_val: dict[str, float]  # every reference's, by label
    requirement_source: str  # who set the requirement: a reference's label, or the baseline's
    warning: str | None
    threshold: float
    requirement: str
    requirement_met: bool
    objective: str
    precisions: list[str]
    schedules: list[str | None]
    chosen: JointCandidate
    front: list[str]  # keys of the candidates on the Pareto front
    candidates_file: str
    ceilings: str | None = None  # the escape / overkill ceilings and recall floors (None: no good class)
    ceilings_met: bool = True  # whether the chosen candidate's operating point meets them
    shortfall: str | None = None  # where no candidate met them all: which and by how much
    runtimes: dict[str, Any] | None = None  # the runtime axis (``runtime_search.RuntimeAxis`` as a dict)
    schedule_search: list[dict[str, Any]] | None = None  # per model: the probe and its searched schedules

    def candidates(self) -> list[JointCandidate]:
        return [JointCandidate.from_dict(c) for c in read_json(self.candidates_file)]


@dataclass(frozen=True)
class FinalResult:
    run: str
    epochs: int
    val_tuned: float  # the run's metric on validation
    val_off_the_shelf: float
    kept_tuned: bool
    checkpoint: str  # chosen/: the model as delivered (ToMe schedule and precision recorded)
    subnet_checkpoint: str  # the fine-tuned subnet before this stage
    test: TestMetrics
    operating: dict[str, Any] | None = None  # the delivered model's OperatingPoint (fitted on validation)

    @property
    def val(self) -> float:
        return self.val_tuned if self.kept_tuned else self.val_off_the_shelf


@dataclass(frozen=True)
class AblationResult:
    rows: list[AblationRecord]
    at_224: At224 | None
    default_tome: str | None


@dataclass(frozen=True)
class ReportResult:
    files: list[str]


ExportResult = DeployInfo  # the deploy folder, or why there is none
QualityResult = QualityInfo  # operating points, bounds, calibration, the comparison to the best reference
