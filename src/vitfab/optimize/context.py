"""What every stage of the main job may use (``JobContext``), what a stage is (``Stage``), and
the loop that runs a list of stages over one run folder, resumably (``run_stages``).

Under ``torchrun`` every process runs the loop. A stage's ``ranks`` says who works in it:
``train`` and ``shard`` stages run on every rank (data-parallel training; candidates or models
shared out and the results gathered), ``main`` stages on rank 0 alone while the others wait for
its result. Rank 0 alone writes the run folder, reads the clock for every plan, and its result
of each stage is every rank's. The process group's timeout is set per stage from its share of
the budget (``collective_timeout``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data.split import Split
from ..evaluate.runner import CachedBatches, make_eval_loader
from ..nas.train import resume_supernet, train_supernet
from ..progress import console
from ..rundir import RunDir
from ..runtime import (PeerFailed, broadcast_object, is_main, on_main, peer_failure, resolve_amp, resolve_device,
                       set_collective_timeout, world)
from ..train import TrainConfig, TrainResult, resume, train
from .budget import epoch_seconds, probe_train_speed
from .config import JobConfig
from .state import JobState


@dataclass(frozen=True)
class Stage:
    """One step of the main job: ``run(ctx, **results)`` gets the typed results of the stages
    named in ``requires`` (as keyword arguments of those names) and returns a ``result``."""

    name: str
    weight: float  # its share of the budget, relative to the others
    run: Callable[..., Any]
    requires: tuple[str, ...]
    result: type
    ranks: str = "main"  # under torchrun: "train", "shard" (every rank works) or "main" (rank 0 alone)


RANKS = ("train", "shard", "main")


def collective_timeout(share: float | None, ranks: str) -> float:
    """Seconds a process waits for the others in one collective during a stage. In a training
    stage the ranks meet at every step, and the longest wait is rank 0's epoch-end work (saving,
    the test pass): twice the stage's share, at least 15 minutes, so a peer that hangs stops the
    run within that. Where rank 0 works alone for most of the stage (the search's timings, the
    export, the ablation) the others wait the whole stage: four times its share, at least an hour.
    Without a budget: 30 minutes (torch's default) and a day."""
    if ranks not in RANKS:
        raise ValueError(f"ranks must be one of {RANKS}, got {ranks!r}")
    if share is None:
        return 1800.0 if ranks == "train" else 86400.0
    return max(900.0, 2 * share) if ranks == "train" else max(3600.0, 4 * share)


class JobContext:
    """The run folder, the settings, the device, the budget and the helpers stages share."""

    def __init__(self, run: RunDir, config: JobConfig, stages: Sequence[Stage], progress: bool = True,
                 split: Split | None = None):
        self.run, self.config, self.progress = run, config, progress and is_main()
        self.initial_split = split  # the user's data, split and checked before the run folder was made
        self.device = resolve_device(config.device)
        self.amp = resolve_amp("auto", self.device)
        budget = config.budget_minutes
        self.state = JobState(run.state_path, budget * 60 if budget else None, {s.name: s.weight for s in stages})

    @property
    def budget(self):
        return self.state.budget

    def plan(self, stage: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return self.state.plan(stage, make)

    def loader(self, split: Split, subset: str, pre) -> CachedBatches:
        """A split's images read once into memory (for many models over the same images)."""
        return CachedBatches(make_eval_loader(split.root, split.subset(subset), pre, 64))

    def epoch_seconds(self, model: torch.nn.Module, split: Split, extra_per_image: float = 0.0,
                      batch_size: int | None = None) -> tuple[float, float]:
        """(seconds per epoch, training img/s) of ``model`` on this split, from a measured step."""
        bs = min(batch_size or self.config.batch_size, 16)
        ips = probe_train_speed(model, bs, self.config.img_size, self.device, self.amp)
        per = 1 / ips + extra_per_image
        return epoch_seconds(len(split.train), len(split.val), 1 / per), ips

    def epochs_for(self, stage: str, nominal: int, model: torch.nn.Module, split: Split, parts: int = 1,
                   extra_per_image: float = 0.0) -> tuple[int, float | None]:
        """Epochs that fit the stage's share, from a measured training speed; and that speed
        (img/s; None without a budget, where nothing is probed)."""
        if self.budget.seconds is None:
            return nominal, None
        sec, ips = self.epoch_seconds(model, split, extra_per_image)
        return self.budget.epochs(stage, nominal, sec, parts), ips

    def time_limit(self, seconds: float | None) -> float | None:
        """A training run's hard stop: its planned time and a margin (the plan is a probe's estimate)."""
        return None if seconds is None else 1.1 * seconds + 2.0

    def train_stage(self, folder: Path, tc: TrainConfig, split: Split, supernet: bool = False) -> TrainResult:
        """Train into ``folder``, or continue it where an interrupted job left it (rank 0 looks:
        the ranks must not see the folder at different moments)."""
        if on_main(lambda: RunDir(folder).config_path.is_file()):
            console.print(f"continuing {folder}")
            return resume_supernet(folder, self.progress) if supernet else resume(folder, self.progress)
        if supernet:
            return train_supernet(tc, folder, self.progress, split=split)
        return train(tc, folder, self.progress, split=split)


def run_stages(ctx: JobContext, stages: Sequence[Stage]) -> dict[str, Any]:
    """Run every stage not finished yet, in order; returns every stage's typed result."""
    results: dict[str, Any] = {}
    for i, stage in enumerate(stages, 1):
        if ctx.state.done(stage.name):
            results[stage.name] = ctx.state.result(stage.name, stage.result)
            continue
        share = ctx.budget.share(stage.name)
        console.print(f"[bold]stage {i}/{len(stages)}: {stage.name}[/bold]"
                      + (f" (budget about {share:.0f} s)" if share is not None else ""))
        set_collective_timeout(collective_timeout(share, stage.ranks))
        t0 = time.perf_counter()
        result = _run_stage(ctx, stage, {name: results[name] for name in stage.requires})
        ctx.state.finish(stage.name, result, broadcast_object(time.perf_counter() - t0))
        results[stage.name] = result
    return results


def _run_stage(ctx: JobContext, stage: Stage, requires: dict[str, Any]) -> Any:
    """The stage's result, rank 0's on every rank; where another process died or stopped
    answering, one line that says how to continue."""
    try:
        if stage.ranks == "main":
            return on_main(lambda: stage.run(ctx, **requires))
        return broadcast_object(stage.run(ctx, **requires))
    except Exception as exc:
        rank, n = world()
        if n == 1 or not (isinstance(exc, PeerFailed) or peer_failure(exc)):
            raise
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise PeerFailed(f"process {rank} of {n} stopped in stage '{stage.name}': {why}; every finished stage and "
                         f"epoch is kept in {ctx.run.root}: continue it with the same torchrun command and "
                         f"`-m vitfab run --resume {ctx.run.root}`") from None
