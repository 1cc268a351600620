"""``summary.json``: the main job's evidence for machines, and what the report is rendered from.

The schema is these frozen dataclasses (``SUMMARY_FORMAT`` names its version); the job fills
them from its stages' typed results, ``write_report`` renders them, and ``Summary.load`` reads a
run's summary.json back, so the report of any run can be rendered again from its file alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VitfabError
from ..files import read_json, write_json_atomic
from ..records import RecordError, from_json, to_json

SUMMARY_FORMAT = "vitfab-summary/4"  # 2: references, teaching, verdicts, primary_speedup; 3: starts, embedding;
# 4: the metric of choice, operating points, confidence bounds (quality)


@dataclass(frozen=True)
class DeviceInfo:
    type: str
    name: str
    threads: int
    torch: str
    train_amp: str
    processes: int = 1  # torchrun's world size: training data-parallel over them, every speed on rank 0's device
    batch: int | None = None  # the global training batch (each process takes batch / processes)


@dataclass(frozen=True)
class DataInfo:
    data: str
    synthetic: bool
    classes: list[str]
    images: dict[str, int]  # train / val / test
    img_size: int
    patch_size: int
    scale: str


@dataclass(frozen=True)
class TestMetrics:
    top1: float
    macro_f1: float
    escape_rate: float | None = None  # at the argmax class
    overkill_rate: float | None = None
    balanced_accuracy: float | None = None
    operating: dict[str, Any] | None = None  # rates, counts and upper bounds at the operating point

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> "TestMetrics":
        """From ``evaluate.classification_metrics``' dict (and its ``operating_point`` entry)."""
        return cls(metrics["top1"], metrics["macro_f1"], metrics.get("escape_rate"), metrics.get("overkill_rate"),
                   metrics.get("balanced_accuracy"), metrics.get("operating_point"))


@dataclass(frozen=True)
class AblationRecord:
    """One row of the ablation: test metrics and speed of one configuration, as measured."""

    name: str
    axes: list[str]
    chosen: bool
    kind: str  # baseline | ablation (the axes, in PyTorch) | reference (a model a user would otherwise train) | runtime
    checkpoint: str
    tome: str | None
    precision: str
    accuracy: float
    macro_f1: float
    escape_rate: float | None
    overkill_rate: float | None
    params: int
    gmacs: float
    img_per_s: float
    speedup: float | None
    latency_ms_p50: float
    latency_ms_p99: float
    joules_per_img: float | None
    energy_note: str | None
    peak_memory_mb: float | None
    batch_size: int
    img_size: int
    r_per_layer: list[int] | None
    img_per_s_runs: list[float]
    confusion_matrix: list[list[int]]
    classes: list[str]
    escape_note: str | None = None
    balanced_accuracy: float | None = None
    runtime: str = "torch"


@dataclass(frozen=True)
class SpeedRow:
    name: str
    params: int
    gmacs: float
    img_per_s: float
    latency_ms_p50: float
    batch_size: int


@dataclass(frozen=True)
class At224:
    """The chosen architecture at 224 px (random weights) against DeiT-B/16: speed only."""

    rows: list[SpeedRow]
    speedup: float
    params_reduction: float
    macs_reduction: float


@dataclass(frozen=True)
class DeployInfo:
    folder: str | None
    error: str | None
    parity_max_abs_diff: dict[str, float]


@dataclass(frozen=True)
class CandidateRow:
    """A joint-search candidate as the report shows it (validation split)."""

    key: str
    model: str
    accuracy: float | None
    macro_f1: float | None
    gmacs: float
    img_per_s: float | None
    latency_ms: float | None
    joules_per_img: float | None
    error: str | None
    front: bool
    chosen: bool
    balanced_accuracy: float | None = None
    operating: dict[str, Any] | None = None  # its operating point on validation
    runtime: str = "torch"
    screened_out: bool = False  # timed in the PyTorch screening pass only


@dataclass(frozen=True)
class JointInfo:
    metric: str  # top1, macro_f1 or balanced_accuracy: what the requirement and the choice compare
    requirement: str
    requirement_met: bool
    requirement_source: str  # the reference (label) or "baseline" the requirement is measured from
    threshold: float
    baseline_val: float
    reference_val: dict[str, float]
    warning: str | None
    objective: str
    schedules: list[str | None]
    precisions: list[str]
    candidates: list[CandidateRow]
    ceilings: str | None = None  # escape / overkill ceilings and recall floors (None: no good class)
    ceilings_met: bool = True
    shortfall: str | None = None  # which ceiling no candidate met, and by how much
    runtimes: dict[str, Any] | None = None  # the runtime axis: asked, used, skipped (with why), screened


@dataclass(frozen=True)
class ReferenceInfo:
    label: str
    name: str  # timm name
    checkpoint: str
    epochs: int
    seconds: float
    budget_seconds: float | None  # what the budget gave it
    val_top1: float
    val_macro_f1: float
    start: str = "random weights"
    val_balanced_accuracy: float = 0.0


@dataclass(frozen=True)
class TeachingInfo:
    teacher: str | None  # label of the teacher, or None
    checkpoint: str | None
    distill: str  # none | soft | hard
    reason: str


@dataclass(frozen=True)
class ChosenInfo:
    model: str
    arch: str
    tome: str | None
    precision: str
    r_per_layer: list[int]
    params: int
    gmacs: float
    checkpoint: str
    val: float  # validation value of the run's selection metric (JointInfo.metric)
    test: TestMetrics
    tome_name: str | None = None  # a searched schedule's name ("searched macs=0.35"; ``tome`` is its r list)

    @property
    def tome_target(self) -> str | None:
        """The fixed target a searched schedule was searched for (``tome`` otherwise)."""
        return self.tome_name.split(" ", 1)[1] if self.tome_name else self.tome


@dataclass(frozen=True)
class BudgetInfo:
    seconds: float | None  # None: no limit
    spent: float
    cuts: list[str]
    stage_seconds: dict[str, float]


@dataclass(frozen=True)
class OperatingRow:
    """One model at its operating point: fitted on validation, measured on test."""

    label: str
    kind: str  # chosen | baseline | reference
    operating: dict[str, Any] | None  # evaluate.operating.OperatingPoint, fitted on validation
    test: dict[str, Any] | None  # rates, counts and 95 % upper bounds at it on the test split
    curve: dict[str, list[float]]  # the test split's threshold sweep: threshold, escape, overkill
    test_metric: float  # the run's accuracy metric on test, at the argmax


@dataclass(frozen=True)
class QualityInfo:
    """The requirement as a quality engineer states it, and how sure the test split lets us be."""

    metric: str
    good_classes: list[str]
    ceilings: str | None  # None: no class may pass, so no escape or overkill
    rows: list[OperatingRow]
    escape_claim: dict[str, Any] | None  # the escape ceiling, the defective test images a claim of it needs
    comparison: dict[str, Any] | None  # chosen minus the best reference on test, paired bootstrap interval
    calibration: dict[str, Any]  # the chosen model on test: ECE and reliability bins before / after scaling

    def row(self, kind: str) -> OperatingRow | None:
        return next((r for r in self.rows if r.kind == kind), None)


def metric_of(record: Any, metric: str) -> float | None:
    """One of the accuracy metrics (top1, macro_f1, balanced_accuracy) of a record that names top-1
    ``accuracy`` (ablation rows, candidates) or ``top1`` (test metrics)."""
    if metric == "top1":
        return getattr(record, "accuracy") if hasattr(record, "accuracy") else record.top1
    return getattr(record, metric, None)


@dataclass(frozen=True)
class Summary:
    run: str
    device: DeviceInfo
    data: DataInfo
    config: dict[str, Any]
    objective: str
    joint: JointInfo
    chosen: ChosenInfo
    references: list[ReferenceInfo]
    teaching: TeachingInfo
    verdicts: list[str]  # plain statements for the last lines: e.g. a reference more accurate and faster
    ablation: list[AblationRecord]
    default_tome: str | None
    at_224: At224 | None
    deploy: DeployInfo | None
    budget: BudgetInfo
    stage_results: dict[str, Any]  # every stage's result as saved in state.json
    starts: dict[str, str] = field(default_factory=dict)  # what each trained model started from
    embed: str = "patch"  # the supernet's (and its subnets') patch embedding
    embed_reason: str = ""
    quality: QualityInfo | None = None
    wall_seconds_this_call: float | None = None
    format: str = SUMMARY_FORMAT

    @property
    def requirement_met(self) -> bool:
        return self.joint.requirement_met

    @property
    def baseline(self) -> AblationRecord | None:
        return self.ablation[0] if self.ablation else None

    @property
    def chosen_row(self) -> AblationRecord | None:
        return next((r for r in self.ablation if r.chosen), None)

    @property
    def primary_speedup(self) -> float | None:
        """The chosen model, with the weights it was tested with, at the size it was trained at,
        against DeiT-B/16 fp32 at that size (the ablation's figure)."""
        row = self.chosen_row
        return None if row is None else row.speedup

    @property
    def baseline_deployed(self) -> AblationRecord | None:
        """The baseline deployed at its best: the fastest of its rows without token merging (any
        runtime, any precision: PyTorch bf16/int8 included) whose test top-1 is within a point of
        its PyTorch fp32 row."""
        base = self.baseline
        rows = [r for r in self.ablation if base is not None and r.checkpoint == base.checkpoint and r.tome is None
                and r.accuracy >= base.accuracy - 0.01]
        return max(rows, key=lambda r: r.img_per_s, default=None)

    @property
    def deployed_speedup(self) -> float | None:
        """The chosen model against the baseline deployed at its best (both deployed well)."""
        row, base = self.chosen_row, self.baseline_deployed
        return None if row is None or base is None or not base.img_per_s else round(row.img_per_s / base.img_per_s, 3)

    def to_dict(self) -> dict[str, Any]:
        return to_json(self) | {"primary_speedup": self.primary_speedup,  # derived: for readers of the JSON
                                "deployed_speedup": self.deployed_speedup}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Summary":
        data = read_json(path)
        if data.get("format") != SUMMARY_FORMAT:
            raise VitfabError(f"{path}: summary format {data.get('format')!r}, this vitfab reads {SUMMARY_FORMAT}")
        data.pop("primary_speedup", None)
        data.pop("deployed_speedup", None)
        try:
            return from_json(cls, data)
        except RecordError as exc:
            raise VitfabError(f"{path} does not hold a {SUMMARY_FORMAT} summary: {exc}") from None
