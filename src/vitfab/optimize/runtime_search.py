"""The runtime axis of the joint search: the PyTorch candidates screened, the survivors converted
to every other runtime and precision, scored there, and all of them timed again together with each
runtime's thread pool in a worker process of its own.

Exporting, calibrating and timing every (model, schedule, precision) in every runtime does not fit
a 2-core budget, so the PyTorch pass screens: the (model, schedule) pairs of the PyTorch Pareto
front and of PyTorch's own choice, fastest first, at most ``SCREEN`` of them, go on. Each is exported
once (ONNX, OpenVINO IR) and every runtime's precisions are built from it -- int8 statically
quantised on calibration images where the runtime's int8 is static. Validation metrics and the
operating point are measured in the runtime itself, never assumed from PyTorch. The final timing
pass holds the survivors in every runtime, PyTorch included (so they are compared like with like);
PyTorch candidates of the other pairs keep their screening speed and are marked ``screened_out``.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..evaluate.accuracy import validation_outputs
from ..evaluate.runner import CachedBatches
from ..measure.energy import MIN_WINDOW_SECONDS
from ..measure.speed import Timed, measure_speed
from ..precision import Precision, PrecisionError, prepare_model
from ..progress import console, make_progress
from ..runtimes import Deployed, convert, runtime_precisions, runtime_reason
from ..tome import apply_spec
from .joint import JointCandidate, choose, joint_front, objective_value, score

SCREEN = 3  # (model, schedule) pairs that go on from the PyTorch pass to the other runtimes
TIGHT_SHARE = 300.0  # seconds: a joint stage with less than this goes on with one pair only


def screen_size(share: float | None) -> int:
    """How many pairs go on: ``SCREEN``, or one where the stage's budget share is tight (a
    conversion, two calibrations and the isolated timing cost about a minute a pair on 2 cores)."""
    return SCREEN if share is None or share >= TIGHT_SHARE else 1


@dataclass
class RuntimeAxis:
    """The runtimes asked for and what became of them."""

    asked: list[str]
    used: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why it cannot run here
    screened: list[str] = field(default_factory=list)  # "model / schedule" pairs that went on
    screened_out: int = 0  # PyTorch candidates timed in the screening pass only


def resolve_runtimes(asked: Sequence[str], device: torch.device) -> RuntimeAxis:
    """The runtimes that run here (torch always first); the others with the reason, in one line each."""
    axis = RuntimeAxis(list(asked))
    for rt in dict.fromkeys(["torch", *asked]):
        reason = runtime_reason(rt, device) or (None if runtime_precisions(rt, device) else
                                                f"no precision of it runs on {device.type}")
        if reason:
            axis.skipped[rt] = reason
            console.print(f"note: runtime {rt} left out of the search: {reason}")
        else:
            axis.used.append(rt)
    return axis


def in_runtime(model: torch.nn.Module, runtime: str, precision: str, device: torch.device, folder: Path,
               calibration: Sequence[np.ndarray] | None = None) -> torch.nn.Module:
    """``model`` (fp32, ToMe applied) as ``runtime`` runs it in ``precision``: prepared in PyTorch,
    or converted afresh into ``folder`` (int8 calibrated on ``calibration``) and built."""
    if runtime == "torch":
        return prepare_model(model, precision, device)
    shutil.rmtree(folder, ignore_errors=True)
    return Deployed(runtime, precision, str(convert(model, runtime, precision, folder, calibration))).build(device)


def screen(cands: Sequence[JointCandidate], threshold: float, objective: str, metric: str,
           limit: int = SCREEN) -> list[tuple[str, str | None]]:
    """The (model, schedule) pairs worth converting: PyTorch's front and its choice, fastest first."""
    front = joint_front(cands, objective, metric)
    if not front:
        return []
    pool = [choose(cands, threshold, objective, metric)[0]] + sorted(
        front, key=lambda c: objective_value(c, objective), reverse=True)
    return list(dict.fromkeys((c.model, c.tome) for c in pool))[:limit]


def _converted(pair_cands: Sequence[JointCandidate], runtimes: Sequence[str], device, val: CachedBatches,
               folder: Path, calibration, load: Callable, operating, bar) -> list[JointCandidate]:
    """One pair in every other runtime and precision, scored on validation in that runtime."""
    first = pair_cands[0]
    fp32 = apply_spec(copy.deepcopy(load(first.checkpoint)), first.tome)
    out = []
    for rt in runtimes:
        for p in runtime_precisions(rt, device):
            c = replace(first, precision=p, runtime=rt, accuracy=None, macro_f1=None, balanced_accuracy=None,
                        operating=None, img_per_s=None, latency_ms=None, joules_per_img=None, error=None)
            try:
                c.artifact = str(convert(fp32, rt, p, folder, calibration))
                model = Deployed(rt, p, c.artifact).build(device)
                score(c, validation_outputs(model, val, device, Precision(p)), operating)
            except (PrecisionError, RuntimeError, ValueError) as exc:  # a runtime that cannot run this graph
                c.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            out.append(c)
            bar.advance(bar.task_ids[-1], 1)
    return out


def runtime_pass(cands: list[JointCandidate], axis: RuntimeAxis, threshold: float, objective: str, metric: str,
                 val: CachedBatches, device: torch.device, workdir: Path, calibration: Sequence[np.ndarray],
                 load: Callable, operating=None, batch_size: int = 16, repeats: int = 3,
                 min_repeat_seconds: float = 0.25, latency_runs: int = 20, progress: bool = True,
                 limit: int = SCREEN) -> list[JointCandidate]:
    """``cands`` (the PyTorch pass, measured) with the other runtimes' candidates added and the
    survivors (at most ``limit`` pairs) timed again, isolated; the rest marked ``screened_out``."""
    others = [rt for rt in axis.used if rt != "torch"]
    pairs = screen(cands, threshold, objective, metric, limit) if others else []
    if not pairs:
        return cands
    axis.screened = [f"{m} / {t or 'no ToMe'}" for m, t in pairs]
    shutil.rmtree(workdir, ignore_errors=True)  # a resumed stage converts afresh: nothing half written is reused
    added: list[JointCandidate] = []
    with make_progress(progress) as bar:
        bar.add_task("joint search: other runtimes", total=len(pairs) * sum(len(runtime_precisions(r, device))
                                                                             for r in others), info="")
        for i, (model, tome) in enumerate(pairs):
            mine = [c for c in cands if (c.model, c.tome) == (model, tome) and c.error is None]
            added += _converted(mine, others, device, val, workdir / f"pair-{i}", calibration, load, operating, bar)
        final = [c for c in cands if (c.model, c.tome) in pairs and c.error is None] + [c for c in added if c.error is None]
        specs = [Deployed(c.runtime, c.precision, c.artifact or c.checkpoint, c.tome if c.runtime == "torch" else None)
                 for c in final]
        items = [Timed(None, val.image_size, batch_size, build=partial(d.build, device), pool=d.runtime) for d in specs]
        energy = MIN_WINDOW_SECONDS if objective == "energy" else None
        speeds = measure_speed(items, device, repeats, min_repeat_seconds, latency_runs, energy, progress=bar,
                               label="joint search: runtimes, isolated", isolate=True)
    for c, s in zip(final, speeds):
        c.img_per_s, c.latency_ms = s.img_per_s, s.latency_ms_p50
        c.joules_per_img = s.energy.joules_per_img if s.energy else None
    timed = {id(c) for c in final}
    for c in cands:
        if id(c) not in timed and c.error is None:
            c.screened_out = True
    axis.screened_out = sum(c.screened_out for c in cands)
    return cands + added
