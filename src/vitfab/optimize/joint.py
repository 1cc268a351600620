"""The joint search: subnet x ToMe schedule x precision, measured, then the choice.

Every combination is a ``JointCandidate``. Its validation top-1 is measured with ToMe applied
off the shelf (no retraining) and the precision mode prepared as it would be deployed; its
speed is measured on the target device with all candidates interleaved (A B C A B C ...), so
drift on a shared machine hits them alike. The choice is a pure rule (``choose``): the best
objective among the candidates whose validation top-1 meets the requirement; where none does,
the most accurate one, flagged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import VitfabError
from ..evaluate.runner import CachedBatches
from ..measure.bench import apply_token_merging
from ..measure.counts import count_macs, count_params
from ..measure.energy import EnergyUnavailable, measure_energy, open_energy_counter
from ..measure.timing import interleaved_latency, interleaved_throughput, median
from ..nas.search import pareto_front
from ..precision import Precision
from ..precision.auto import prepared_accuracy
from ..progress import make_progress
from ..tome import ScheduleError, tome_info

OBJECTIVES = ("throughput", "latency", "energy")


@dataclass
class Requirement:
    """What the chosen model must reach on validation: an absolute top-1, or at most
    ``max_drop`` points below the baseline's."""

    min_accuracy: float | None = None  # fraction in [0, 1]
    max_drop: float | None = 1.0  # points of top-1

    def validate(self) -> None:
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise VitfabError(f"--min-accuracy must lie in [0, 1] (or 0-100 in percent), got {self.min_accuracy}")
        if self.max_drop is not None and self.max_drop < 0:
            raise VitfabError(f"--max-drop must be >= 0 points, got {self.max_drop}")

    def threshold(self, baseline_accuracy: float) -> float:
        if self.min_accuracy is not None:
            return self.min_accuracy
        return baseline_accuracy - (self.max_drop or 0.0) / 100

    def describe(self, baseline_accuracy: float | None = None) -> str:
        if self.min_accuracy is not None:
            return f"validation top-1 >= {100 * self.min_accuracy:.2f} %"
        text = f"validation top-1 at most {self.max_drop:g} points below the DeiT-B/16 baseline"
        if baseline_accuracy is not None:
            text += f" ({100 * baseline_accuracy:.2f} % -> >= {100 * self.threshold(baseline_accuracy):.2f} %)"
        return text


@dataclass
class JointCandidate:
    model: str  # label of the trained model, e.g. "subnet-1"
    checkpoint: str
    tome: str | None  # ToMe schedule spec; None: no merging
    precision: str
    arch: str = ""
    params: int = 0
    gmacs: float = 0.0
    r_per_layer: list[int] = field(default_factory=list)
    accuracy: float | None = None  # validation top-1
    img_per_s: float | None = None
    latency_ms: float | None = None  # batch 1, median
    joules_per_img: float | None = None
    error: str | None = None  # could not run (unsupported mode, non-finite logits, unreachable schedule)

    @property
    def key(self) -> str:
        return f"{self.model} / {self.tome or 'no ToMe'} / {self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"key": self.key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JointCandidate":
        d = {k: v for k, v in d.items() if k != "key"}
        return cls(**d)


def objective_value(c: JointCandidate, objective: str) -> float | None:
    """Higher is better: img/s, or minus ms / J."""
    if objective == "throughput":
        return c.img_per_s
    if objective == "latency":
        return None if c.latency_ms is None else -c.latency_ms
    return None if c.joules_per_img is None else -c.joules_per_img


def usable(cands: Sequence[JointCandidate], objective: str) -> list[JointCandidate]:
    return [c for c in cands if c.error is None and c.accuracy is not None and objective_value(c, objective) is not None]


def joint_front(cands: Sequence[JointCandidate], objective: str) -> list[JointCandidate]:
    """Candidates that no other beats on both validation top-1 and the objective."""
    return pareto_front(usable(cands, objective), lambda c: -objective_value(c, objective))


def choose(cands: Sequence[JointCandidate], threshold: float, objective: str) -> tuple[JointCandidate, bool]:
    """The best objective with top-1 >= threshold (ties: higher top-1, then fewer MACs); where no
    candidate meets it, the most accurate one and ``False``."""
    ok = usable(cands, objective)
    if not ok:
        raise VitfabError("no candidate of the joint search could be measured")
    meeting = [c for c in ok if c.accuracy >= threshold - 1e-12]
    if meeting:
        return max(meeting, key=lambda c: (objective_value(c, objective), c.accuracy, -c.gmacs)), True
    return max(ok, key=lambda c: (c.accuracy, objective_value(c, objective))), False


def check_objective(objective: str, device: torch.device) -> None:
    """Fail before any work where the objective cannot be measured here."""
    if objective not in OBJECTIVES:
        raise VitfabError(f"--objective must be one of {', '.join(OBJECTIVES)}, got '{objective}'")
    if objective == "energy":
        try:
            counter = open_energy_counter(device)
        except EnergyUnavailable as exc:
            raise VitfabError(f"--objective energy needs an energy counter on {device.type}: {exc}") from None
        close = getattr(counter, "close", None)
        if close is not None:
            close()


def joint_search(
    models: Sequence[tuple[str, str, str]],
    schedules: Sequence[str | None],
    precisions: Sequence[Precision],
    val_batches: CachedBatches,
    device: torch.device,
    objective: str = "throughput",
    batch_size: int = 16,
    repeats: int = 3,
    min_repeat_seconds: float = 0.25,
    latency_runs: int = 20,
    progress: bool = True,
    load: Callable[[str], torch.nn.Module] | None = None,
) -> list[JointCandidate]:
    """Every (model, schedule, precision): validation top-1, then speed, interleaved.

    ``models``: (label, checkpoint, arch description). ``load(checkpoint)`` gives the fp32 model
    (default ``vitfab.load_model``).
    """
    if load is None:
        from ..models import load_model as load
    device = torch.device(device)
    cands: list[JointCandidate] = []
    ready: list[tuple[JointCandidate, torch.nn.Module]] = []
    total = len(models) * len(schedules) * len(precisions)
    with make_progress(progress) as bar:
        t = bar.add_task("joint search: accuracy", total=total, info="")
        for label, ckpt, arch in models:
            fp32 = load(ckpt)
            for spec in schedules:
                try:
                    merged = apply_token_merging(fp32, spec)
                    err = None
                except ScheduleError as exc:
                    merged, err = None, str(exc)
                info = tome_info(merged) if merged is not None else None
                params = count_params(merged) if merged is not None else 0
                macs = count_macs(merged) if merged is not None else 0
                for p in precisions:
                    c = JointCandidate(label, ckpt, spec, p.value, arch, params, macs / 1e9,
                                       info["r_per_layer"] if info else [], error=err)
                    cands.append(c)
                    if err is None:
                        m, c.accuracy, c.error = prepared_accuracy(merged, p, val_batches, device)
                        if m is not None:
                            ready.append((c, m))
                    bar.update(t, advance=1, info=c.key)
        if ready:
            x = torch.randn(batch_size, 3, *val_batches.image_size, generator=torch.Generator().manual_seed(0))
            x, x1 = x.to(device), x[:1].to(device)
            fns = [(lambda m=m: m(x)) for _, m in ready]
            fns1 = [(lambda m=m: m(x1)) for _, m in ready]
            with torch.inference_mode():
                t = bar.add_task("joint search: throughput", total=repeats, info=f"{len(ready)} interleaved")
                speeds = interleaved_throughput(fns, [batch_size] * len(fns), device, repeats, min_repeat_seconds,
                                                on_round=lambda: bar.advance(t))
                t = bar.add_task("joint search: latency", total=latency_runs, info="batch 1")
                lats = interleaved_latency(fns1, device, latency_runs, on_round=lambda: bar.advance(t))
                for (c, _), s, lat in zip(ready, speeds, lats):
                    c.img_per_s, c.latency_ms = median(s), median(lat)
                if objective == "energy":
                    t = bar.add_task("joint search: energy", total=len(ready), info=">= 3 s each")
                    for (c, _), fn in zip(ready, fns):
                        c.joules_per_img = measure_energy(fn, batch_size, device).joules_per_img
                        bar.advance(t)
    return cands
