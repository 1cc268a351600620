"""Resuming any trainer's run folder after its last complete epoch (``Trainer`` and the supernet's):
the folder's kind and world size checked, weights, optimizer, scheduler and scaler restored."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.split import Split
from ..errors import VitfabError
from ..files import existing_dir
from ..lock import run_lock
from ..models.checkpoint import STATE_FILE, read_meta
from ..models.weights import read_state_dict
from ..progress import console
from ..rundir import WEIGHTS_FILE, RunDir
from ..runtime import barrier, world


def resume_run(run_dir: str | Path, kind: str, config_cls, build, trainer_cls, progress: bool = True):
    """The resume procedure for any trainer: ``build(config, classes, with_weights)`` makes the
    model, ``trainer_cls(run, config, split, progress)`` trains it."""
    run = RunDir.open(run_dir)
    with run_lock(run.root):
        return _resume_locked(run, kind, config_cls, build, trainer_cls, progress)


def _resume_locked(run: RunDir, kind: str, config_cls, build, trainer_cls, progress: bool):
    cfg = run.read_config()
    if cfg.get("kind") != kind:
        raise VitfabError(f"{run.root} is not a {kind} run (it is '{cfg.get('kind')}')")
    if cfg.get("world_size", 1) != world()[1]:
        raise VitfabError(f"{run.root} was trained by {cfg.get('world_size', 1)} process(es); resume it with as "
                          f"many (torchrun --nproc_per_node; now {world()[1]}), or its batches and LR schedule would "
                          f"not line up")
    config = config_cls.from_dict(cfg["train"])
    split = Split.load(run.split_path)
    trainer = trainer_cls(run, config, split, progress)
    last = existing_dir(run.checkpoint("last"))
    if last is None:  # killed before the first epoch ended: start over with the same split
        trainer.setup(build(config, split.classes, True))
        if trainer.rank == 0:
            run.truncate_metrics(-1)
            console.print(f"resuming {run.root} from the start (no complete epoch)")
        return trainer.fit()
    model = build(config, split.classes, False)
    model.load_state_dict(read_state_dict(last / WEIGHTS_FILE))
    model.vitfab_meta = read_meta(last)
    trainer.setup(model)
    state = torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)
    trainer.restore(state)
    if trainer.rank == 0:
        run.truncate_metrics(trainer.start_epoch - 1)
        if trainer.start_epoch >= config.epochs and cfg.get("status") == "done":
            console.print(f"{run.root} has already finished all {config.epochs} epochs")
        else:
            console.print(f"resuming {run.root} at epoch {trainer.start_epoch + 1}/{config.epochs}")
    barrier()
    return trainer.fit()
