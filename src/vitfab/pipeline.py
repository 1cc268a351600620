"""The main job (``vitfab run``) until the joint optimiser lands: data -> baseline -> metrics.

With no data folder it synthesises the X-ray package-defect set into the run folder, trains a
small DeiT baseline for a short budget, evaluates the best checkpoint once on the test split
and returns the metrics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data.synth import CLASSES, SynthConfig, synthesize
from .progress import console, task
from .rundir import RunDir
from .train import TrainConfig, TrainResult, train
from .train.loop import check_config, prepare_split


@dataclass
class MainJobConfig:
    data: str | None = None  # None: synthesise
    n_per_class: int = 200
    synth_img_size: int | None = None  # None: the baseline's img_size
    difficulty: float = 0.5
    model: str = "deit_tiny_patch16_224"
    img_size: int = 64
    patch_size: int = 8
    epochs: int = 16
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"


def run_main_job(config: MainJobConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    tc = TrainConfig(data=config.data or "", model=config.model, img_size=config.img_size,
                     patch_size=config.patch_size, epochs=config.epochs, batch_size=config.batch_size,
                     seed=config.seed, device=config.device, warmup_epochs=min(2.0, config.epochs / 5))
    check_config(tc)
    # every check before anything is written: bad data or settings leave no half-made run folder
    split = prepare_split(tc, progress) if config.data else None
    synth = SynthConfig(n_per_class=config.n_per_class, img_size=config.synth_img_size or config.img_size,
                        seed=config.seed, difficulty=config.difficulty)
    run = RunDir.create(out, prefix="run")
    run.write_config({"kind": "main", "status": "running", "main": asdict(config)})
    data = config.data
    if data is None:
        data = str(run.root / "data")
        with task("synthesising X-ray set", total=len(CLASSES) * config.n_per_class, enabled=progress) as adv:
            meta = synthesize(data, synth, on_progress=adv)
        console.print(f"synthetic data: {len(CLASSES)} classes x {config.n_per_class} images "
                      f"at {synth.img_size} px in {meta['seconds']:.1f} s -> {data}")
    tc.data = data
    result: TrainResult = train(tc, out=run.root / "baseline", progress=progress, split=split)
    summary = {
        "run": str(run.root),
        "data": data,
        "baseline_run": str(result.run.root),
        "best_epoch": result.best_epoch,
        "val": {k: result.best_val.get(k) for k in ("val_top1", "val_macro_f1")},
        "test": {k: result.test.get(k) for k in ("top1", "macro_f1", "escape_rate", "overkill_rate")}
        if result.test else None,
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    cfg = run.read_config()
    cfg.update(status="done", summary=summary)
    run.write_config(cfg)
    return summary
