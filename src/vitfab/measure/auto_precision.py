"""Precision ``auto``, measured: every mode's validation top-1 and img/s on the target device,
then ``precision.choose_precision``'s rule (the fastest within tolerance of fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import VitfabError
from ..evaluate.accuracy import prepared_accuracy
from ..evaluate.api import labelled_samples
from ..evaluate.runner import make_eval_loader
from ..options import option, split_list
from ..precision import (DEFAULT_TOLERANCE, Precision, PrecisionChoice, PrecisionTrial, candidate_precisions,
                         choose_precision, parse_precision, with_reference)
from ..progress import task
from ..runtime import resolve_device
from ..runtimes import load_model
from .counts import input_size
from .speed import Timed, default_batch, measure_speed


def select_precision(
    model: nn.Module,
    loader,
    device: torch.device | str = "cpu",
    tolerance: float = DEFAULT_TOLERANCE,
    candidates: Sequence[Precision | str] | None = None,
    repeats: int = 3,
    min_repeat_seconds: float = 0.5,
    progress: bool = True,
) -> PrecisionChoice:
    """Resolve ``auto`` for ``model`` on ``device`` using the labelled ``loader`` (validation)."""
    device = torch.device(device)
    modes = with_reference(candidates if candidates else candidate_precisions(device))
    trials, runnable = [], []
    with task("precision: accuracy", total=len(modes), enabled=progress) as advance:
        for p in modes:
            trial = PrecisionTrial(p.value)
            trials.append(trial)
            m, trial.accuracy, trial.error = prepared_accuracy(model, p, loader, device)
            if m is not None:
                runnable.append((trial, m))
            advance(1, p.value)
    items = [Timed(m, input_size(model), default_batch(device)) for _, m in runnable]
    speeds = measure_speed(items, device, repeats, min_repeat_seconds, latency_runs=0, progress=progress,
                           label="precision")
    for (trial, _), s in zip(runnable, speeds):
        trial.img_per_s = s.img_per_s
    return choose_precision(trials, tolerance, str(device))


@dataclass
class PrecisionRequest:
    """``vitfab precision``: resolve ``auto`` for a checkpoint on labelled data."""

    checkpoint: str | None = option(None, help="A vitfab checkpoint or run folder (its val split is used).")
    data: str | None = option(None, help="Labelled folder to check accuracy on [default: the run's val split].")
    device: str = option("auto", help="cpu, cuda or auto.")
    tolerance: float = option(DEFAULT_TOLERANCE, help="Allowed top-1 drop vs fp32 (0.01 = one point).")
    candidates: str | None = option(None, help="Comma list of modes to try [default: all that run here].")
    repeats: int = option(3, help="Throughput repeats per mode.")

    def run(self, progress: bool = True) -> tuple[PrecisionChoice, str]:
        """(the choice, a description of the data it was made on)."""
        if self.checkpoint is None:
            raise VitfabError("--checkpoint is required: a vitfab checkpoint or run folder")
        dev = resolve_device(self.device)
        modes = None
        if self.candidates:
            modes = [parse_precision(p, allow_auto=False) for p in split_list(self.candidates, "--candidates")]
        net = load_model(self.checkpoint, "cpu")
        source = labelled_samples(net, self.checkpoint, self.data, progress)
        if source is None:
            raise VitfabError("no labelled data: give --data DIR, or a run folder whose data is still in place")
        root, samples, desc = source
        loader = make_eval_loader(root, samples, net.vitfab_meta.preprocess)
        return select_precision(net, loader, dev, self.tolerance, modes, repeats=self.repeats,
                                progress=progress), desc
