"""The joint search: subnet x ToMe schedule x precision (x runtime, ``runtime_search``), measured,
then the choice.

Every combination is a ``JointCandidate``. Its validation metrics are measured with ToMe applied
off the shelf (no retraining) and the precision mode prepared as it would be deployed, and where
the data have a good class its operating point (temperature and reject threshold,
``evaluate.operating``) is fitted on those same outputs; its speed is measured on the target
device with all candidates interleaved (A B C A B C ...), so drift on a shared machine hits them
alike. The choice is a pure rule (``choose``): the best objective among the candidates that meet
the accuracy requirement and whose operating point meets the escape / overkill ceilings; where
none does, the most accurate of those meeting the ceilings (else of all), flagged.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import VitfabError
from ..evaluate.accuracy import prepared_outputs, scores_of
from ..evaluate.operating import OperatingPoint
from ..evaluate.runner import CachedBatches
from ..measure.counts import count_macs, count_params
from ..measure.energy import MIN_WINDOW_SECONDS, EnergyUnavailable, open_energy_counter
from ..measure.speed import Timed, measure_speed
from ..nas.search import pareto_front
from ..precision import Precision, prepare_model
from ..progress import make_progress
from ..runtime import is_main, map_shards, on_main, world
from ..runtimes import load_model
from ..tome import ScheduleError, apply_spec, tome_info

OBJECTIVES = ("throughput", "latency", "energy")


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
    macro_f1: float | None = None  # validation macro-F1
    balanced_accuracy: float | None = None  # validation balanced accuracy
    operating: dict[str, Any] | None = None  # its OperatingPoint fitted on validation (None: no good class)
    img_per_s: float | None = None
    latency_ms: float | None = None  # batch 1, median
    joules_per_img: float | None = None
    error: str | None = None  # could not run (unsupported mode, non-finite logits, unreachable schedule)
    runtime: str = "torch"  # the deploy runtime it was measured in (``vitfab.runtimes``)
    artifact: str | None = None  # what that runtime runs (None: the checkpoint, in PyTorch)
    screened_out: bool = False  # timed only in the PyTorch screening pass: not a choice (``runtime_search``)
    tome_name: str | None = None  # a searched schedule's name, e.g. "searched macs=0.35" (``tome`` is its r list)

    def score(self, metric: str = "top1") -> float | None:
        """The validation value of one of ``evaluate.metrics.METRICS``."""
        return {"top1": self.accuracy, "macro_f1": self.macro_f1, "balanced_accuracy": self.balanced_accuracy}[metric]

    @property
    def meets_ceilings(self) -> bool:
        """Whether its operating point meets the escape / overkill ceilings (no good class: nothing to meet)."""
        return self.operating is None or bool(self.operating["met"])

    @property
    def key(self) -> str:
        base = f"{self.model} / {self.tome_name or self.tome or 'no ToMe'} / {self.precision}"
        return base if self.runtime == "torch" else f"{base} / {self.runtime}"

    @property
    def tome_target(self) -> str | None:
        """The fixed target a searched schedule was searched for (its ``tome`` otherwise): what a
        model of another depth or resolution merges to stand for this candidate's schedule."""
        return self.tome_name.split(" ", 1)[1] if self.tome_name else self.tome

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


def usable(cands: Sequence[JointCandidate], objective: str, metric: str = "top1") -> list[JointCandidate]:
    return [c for c in cands if c.error is None and not c.screened_out and c.score(metric) is not None
            and objective_value(c, objective) is not None]


def joint_front(cands: Sequence[JointCandidate], objective: str, metric: str = "top1") -> list[JointCandidate]:
    """Candidates that no other beats on both the validation metric and the objective."""
    keys = {c.key for c in pareto_front(usable(cands, objective, metric), lambda c: -objective_value(c, objective),
                                        lambda c: c.score(metric))}
    return [c for c in cands if c.key in keys]  # in the search's order


def choose(cands: Sequence[JointCandidate], threshold: float, objective: str,
           metric: str = "top1") -> tuple[JointCandidate, bool]:
    """The best objective among the candidates with the validation metric >= threshold whose
    operating point meets the ceilings (ties: higher metric, then fewer MACs); where none meets
    both, the best on the metric of those meeting the ceilings (else of all), and ``False``."""
    ok = usable(cands, objective, metric)
    if not ok:
        raise VitfabError("no candidate of the joint search could be measured")
    meeting = [c for c in ok if c.score(metric) >= threshold - 1e-12 and c.meets_ceilings]
    if meeting:
        return max(meeting, key=lambda c: (objective_value(c, objective), c.score(metric), -c.gmacs)), True
    return max(ok, key=lambda c: (c.meets_ceilings, c.score(metric), objective_value(c, objective))), False


def shortfall(cands: Sequence[JointCandidate], threshold: float, metric: str) -> str | None:
    """Where no candidate meets both the accuracy requirement and the ceilings: which and by how much."""
    fitted = [c for c in cands if c.operating is not None and c.error is None and not c.screened_out]
    if not fitted or any(c.meets_ceilings and c.score(metric) >= threshold - 1e-12 for c in fitted):
        return None
    if not any(c.meets_ceilings for c in fitted):
        best = min(fitted, key=lambda c: c.operating["overkill_rate"])
        return f"no candidate meets the ceilings; the closest, {best.key}: {best.operating['shortfall']}"
    return "the candidates whose operating point meets the ceilings all miss the accuracy requirement"


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


def score(c: JointCandidate, outputs: tuple[np.ndarray, np.ndarray], operating) -> None:
    """Fill ``c``'s validation metrics and operating point from its (logits, targets)."""
    scores = scores_of(*outputs)
    c.accuracy, c.macro_f1 = scores["top1"], scores["macro_f1"]
    c.balanced_accuracy = scores["balanced_accuracy"]
    fitted = operating(*outputs) if operating is not None else None
    c.operating = None if fitted is None else fitted.to_dict()


def _merged_models(load: Callable[[str], torch.nn.Module]):
    """``merged(checkpoint, spec)``: (the fp32 model with ToMe ``spec`` applied, or None; the
    reason it could not be; r per layer; params; MACs), each loaded and patched once."""
    fp32: dict[str, torch.nn.Module] = {}
    cache: dict[tuple[str, str | None], tuple] = {}

    def merged(ckpt: str, spec: str | None):
        if (ckpt, spec) not in cache:
            if ckpt not in fp32:
                fp32[ckpt] = load(ckpt)
            try:  # a copy per schedule: tome.apply patches in place
                m, err = apply_spec(copy.deepcopy(fp32[ckpt]), spec), None
            except ScheduleError as exc:
                m, err = None, str(exc)
            info = tome_info(m) if m is not None else None  # None also without merging
            r = info["r_per_layer"] if info else []
            cache[(ckpt, spec)] = (m, err, r, count_params(m) if m is not None else 0,
                                   count_macs(m) if m is not None else 0)
        return cache[(ckpt, spec)]

    return merged


def _accuracy_pass(models, schedules, precisions, val_batches, device, load, bar, operating, searched):
    """Every (model, schedule, precision) with its validation metrics and operating point (under
    ``torchrun`` the combinations are shared out over the ranks and every rank gets them all);
    and, on rank 0, the prepared models of those that run. ``searched[label]``: (name, spec) of
    that model's searched schedules."""
    jobs = [(label, ckpt, arch, name, spec, p) for label, ckpt, arch in models
            for name, spec in [(None, s) for s in schedules] + list(searched.get(label, ())) for p in precisions]
    rank, n = world()
    t = bar.add_task("joint search: accuracy", total=len(jobs[rank::n]), info="")
    merged, prepared = _merged_models(load), {}

    def measure(i: int) -> JointCandidate:
        label, ckpt, arch, name, spec, p = jobs[i]
        model, err, r, params, macs = merged(ckpt, spec)
        c = JointCandidate(label, ckpt, spec, p.value, arch, params, macs / 1e9, r, error=err, tome_name=name)
        if err is None:
            m, outputs, c.error = prepared_outputs(model, p, val_batches, device)
            if m is not None:
                score(c, outputs, operating)
                if is_main():  # kept for the timing, which is rank 0's
                    prepared[i] = m
        bar.update(t, advance=1, info=c.key)
        return c

    cands = map_shards(measure, range(len(jobs)))
    ready = {} if not is_main() else {  # rank 0 times them all: prepare those another rank measured
        i: prepared[i] if i in prepared else prepare_model(merged(c.checkpoint, c.tome)[0], Precision(c.precision),
                                                           device)
        for i, c in enumerate(cands) if c.error is None}
    return cands, ready


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
    load: Callable[[str], torch.nn.Module] = load_model,
    operating: Callable[[np.ndarray, np.ndarray], OperatingPoint] | None = None,
    searched: dict[str, Sequence[tuple[str, str]]] | None = None,
) -> list[JointCandidate]:
    """Every (model, schedule, precision): validation metrics, then speed, interleaved (under
    ``torchrun``: the validation passes shared out over the ranks, the speed on rank 0's device).

    ``models``: (label, checkpoint, arch description). ``load(checkpoint)`` gives the fp32 model
    (default ``vitfab.load_model``). ``operating(logits, targets)``: the operating point fitted on
    a candidate's validation outputs (as prepared), where the data have a good class.
    ``searched[label]``: (name, per-block spec) of schedules searched for that model alone, tried
    after the grid's.
    """
    device = torch.device(device)
    with make_progress(progress) as bar:
        cands, ready = _accuracy_pass(models, schedules, precisions, val_batches, device, load, bar, operating,
                                      searched or {})
        timed = [i for i, c in enumerate(cands) if c.error is None]

        def time_them() -> list[tuple[float, float, float | None]]:  # on rank 0's device alone
            items = [Timed(ready[i], val_batches.image_size, batch_size) for i in timed]
            energy = MIN_WINDOW_SECONDS if objective == "energy" else None
            speeds = measure_speed(items, device, repeats, min_repeat_seconds, latency_runs, energy, progress=bar,
                                   label="joint search")
            return [(s.img_per_s, s.latency_ms_p50, s.energy.joules_per_img if s.energy else None) for s in speeds]

        for i, (ips, ms, joules) in zip(timed, on_main(time_them) if timed else []):
            cands[i].img_per_s, cands[i].latency_ms, cands[i].joules_per_img = ips, ms, joules
    return cands
