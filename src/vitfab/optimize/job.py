"""The main job, ``vitfab run``: from a folder of labelled images to the fastest ViT that meets
the accuracy requirement, with the evidence (the stages: ``stages.PIPELINE``).

Every check runs before the run folder is made; ``state.json`` records the finished stages, so
``vitfab run --resume RUN`` skips them and continues an interrupted training where it stopped.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path

from ..data.split import Split
from ..data.synth import CLASSES
from ..errors import VitfabError
from ..files import read_json
from ..evaluate.metrics import good_classes
from ..lock import run_lock
from ..measure.counts import count_macs, count_params
from ..models import create_model
from ..models.arch import SearchSpace, arch_macs, arch_params
from ..models.factory import check_model_name
from ..precision.modes import check_supported
from ..progress import console
from ..records import RecordError, from_json
from ..report.summary import Summary
from ..rundir import CONFIG_FILE, RunDir
from ..runtime import (PeerFailed, gather_objects, init_distributed, is_main, on_main, processes, resolve_device,
                       world)
from ..train.loop import check_config, prepare_split
from .config import JobConfig, passable_classes
from .context import JobContext, run_stages
from .joint import check_objective
from .stages import PIPELINE
from .training_stages import LABELS
from .summary import build_summary


def check_job(config: JobConfig, progress: bool = True) -> tuple[JobConfig, Split | None]:
    """Every check before the run folder is made: settings, device, objective, data and split, the
    good classes and the ceilings on them."""
    config = config.resolved()
    config.validate()
    device = resolve_device(config.device)
    check_objective(config.objective, device)
    check_model_name(config.baseline_model)
    if config.baseline_weights and not Path(config.baseline_weights).is_file():
        raise VitfabError(f"--baseline-weights not found: {config.baseline_weights}")
    check_references(config)
    for mode in config.precision_modes(device):
        check_supported(mode, device)
    check_space(config)
    split = None
    if config.data is not None:
        tc = config.train_config(config.data)
        check_config(tc)
        split = prepare_split(tc, progress)
        passable_classes(split, config.good_class, config.ceilings())
    else:  # the synthetic set's split is made in the data stage, which checks it again
        config.ceilings().check(CLASSES, good_classes(list(CLASSES), config.good_class))
    return config, split


def check_references(config: JobConfig) -> None:
    """Reference names, --requirement-from and --teacher, before any training."""
    names = config.reference_names()
    for name in names:
        try:
            check_model_name(name)
        except VitfabError as exc:
            raise VitfabError(f"--references: {exc}") from None
    labels = {n.lower() for n in names} | {LABELS.get(n, n).lower() for n in names}
    how = config.requirement_from
    if how not in ("best", "baseline") and how.lower() not in labels:
        raise VitfabError(f"--requirement-from {how}: choose best, baseline or one of the references "
                          f"({', '.join(names) or 'none given'})")
    if config.teacher and not Path(config.teacher).exists():
        raise VitfabError(f"--teacher not found: {config.teacher}")


def check_space(config: JobConfig) -> None:
    """The search limits (the baseline's params and GMACs / --min-reduction) must admit the
    space's smallest subnet: found out now, not after the baseline and the supernet trained."""
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


def run_job(config: JobConfig, out: str | Path | None = None, progress: bool = True) -> Summary:
    """A new main job (see ``stages``); returns its summary. Under ``torchrun`` every process
    calls it: rank 0 makes the run folder, the others open it."""
    config, split = check_job(config, progress and is_main())

    def create() -> str:
        run = RunDir.create(Path(out).resolve() if out is not None else None, prefix="run")
        run.write_config({"kind": "main", "status": "running", "job": asdict(config), "world_size": processes()})
        console.print(f"run folder: {run.root}")
        return str(run.root.resolve())

    return _finish(JobContext(_shared(on_main(create)), config, PIPELINE, progress, split))


def _shared(root: str) -> RunDir:
    """The run folder rank 0 made, opened on every rank; refused in one line where a rank cannot
    see it (several machines without a filesystem they share)."""
    seen = gather_objects(RunDir(Path(root)).config_path.is_file())
    if any(seen) and not all(seen):
        blind = ", ".join(str(k) for k, ok in enumerate(seen) if not ok)
        raise VitfabError(f"the run folder {root} is not visible to process(es) {blind}: on several machines, put "
                          f"--out on a filesystem they all share")
    return RunDir.open(root)


def resume_job(run_dir: str | Path, progress: bool = True) -> Summary:
    """Continue a main job after an interruption: finished stages are kept, the one in progress
    continues (training after its last complete epoch, the search after its last generation).
    Under ``torchrun`` with another number of processes than before, the finished stages are
    kept and a training stage in progress is refused in one line (its batches were cut for
    the old number)."""
    run = _shared(str(Path(run_dir).resolve()))
    cfg = run.read_config()
    if cfg.get("kind") != "main" or "job" not in cfg:
        raise VitfabError(f"{run.root} is not a main-job run folder (vitfab run)")
    try:
        config = from_json(JobConfig, cfg["job"])
    except RecordError as exc:
        raise VitfabError(f"{run.root} was made with other settings than this vitfab knows ({exc}); start a new "
                          f"run") from None
    split = Split.load(run.split_path) if run.split_path.is_file() else None
    before, now = cfg.get("world_size", 1), world()[1]
    if before != now:
        console.print(f"{run.root} was started by {before} process(es), now {now}: its finished stages are kept")
    return _finish(JobContext(run, config, PIPELINE, progress, split))


def _finish(ctx: JobContext) -> Summary:
    """Run the stages with the run folder locked (one writer)."""
    with run_lock(ctx.run.root):
        t0 = time.perf_counter()
        results = run_stages(ctx, PIPELINE)

        def summarise() -> Summary:
            summary = build_summary(ctx, results, round(time.perf_counter() - t0, 1))
            summary.save(ctx.run.summary_path)
            ctx.run.set_status("done")
            return summary

        return on_main(summarise)


def recorded_device(run_dir: str | Path) -> str:
    """The --device a main-job run folder was started with ("auto" where it cannot be read)."""
    try:
        return str(read_json(Path(run_dir) / CONFIG_FILE)["job"]["device"])
    except (OSError, ValueError, KeyError, TypeError):
        return "auto"  # resume_job says what is wrong with the folder


def join_processes(device: str) -> None:
    """Under torchrun: join the process group, keep the other ranks' notes quiet (rank 0 speaks),
    and turn torchrun's SIGTERM (sent to every process once one has failed) into a line."""
    rank, n = init_distributed(device)
    if n == 1:
        return
    console.quiet = rank != 0

    def stopped(signum, frame):
        raise PeerFailed("stopped by torchrun (SIGTERM), which stops every process once one has failed")

    signal.signal(signal.SIGTERM, stopped)
