"""``vitfab sweep``: the ToMe paper's off-the-shelf analysis on a labelled folder (ImageNet-1k val
in its synset-folder layout, or any folder named after the model's classes): top-1 and img/s of
every ToMe r x precision mode.

Accuracy is the long part (a full pass over the data per configuration); each result is appended
to ``results.jsonl`` as it completes, so a killed sweep resumes with the configurations it has.
Throughput and batch-1 latency are then measured for all configurations interleaved, in one run.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.images import max_pixels_option, scan_checked
from ..errors import DataError, VitfabError
from ..evaluate.accuracy import validation_accuracy
from ..evaluate.runner import make_eval_loader
from ..files import atomic_path, read_json, write_json_atomic
from ..lock import run_lock
from ..models import create_model
from ..options import option, split_list
from ..precision import Precision, parse_precision, prepare_model, unsupported_reason
from ..progress import console, make_progress
from ..runtime import resolve_device
from ..runtimes import load_model
from ..tome import apply_spec, parse_tome_spec
from .counts import count_macs
from .speed import Timed, default_batch, measure_speed


@dataclass
class SweepConfig:
    data: str | None = option(None, help="Labelled folder: ImageNet-1k val (synset folders) or the model's classes.")
    model: str | None = option(None, help="timm model name, with --pretrained or --weights.")
    pretrained: bool = option(False, help="With --model: timm's hub weights.")
    weights: str | None = option(None, help="With --model: a local weights file.")
    checkpoint: str | None = option(None, help="Or a vitfab checkpoint (e.g. an extracted AutoFormer subnet).")
    img_size: int | None = option(None, help="With --model: input size override.")
    patch_size: int | None = option(None, help="With --model: patch size override.")
    tome_r: str = option("0,4,8,12,16", help="ToMe schedules, comma list (R, R:INFLECTION, keep=F, macs=F).")
    precision: str = option("fp32,bf16", help="Precision modes, comma list.")
    max_images: int | None = option(None, help="A seeded subset of the folder, for a quick look.")
    max_image_pixels: int = max_pixels_option()
    batch_size: int = option(64, help="Batch size of the accuracy passes.")
    seed: int = option(0, help="Seed of the subset.", cli=False)
    device: str = option("auto", help="auto, cpu or cuda.")
    repeats: int = option(5, help="Throughput repeats per configuration (median reported).")
    min_repeat_seconds: float = option(1.0, help="Each throughput repeat lasts at least this long.")

    @property
    def schedules(self) -> list[str]:
        return split_list(self.tome_r, "--tome-r")

    @property
    def precisions(self) -> list[str]:
        return [parse_precision(p, allow_auto=False).value for p in split_list(self.precision, "--precision")]

    def validate(self) -> None:
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
        if self.model is not None and not (self.pretrained or self.weights):
            raise VitfabError("--model needs --pretrained or --weights PATH (an untrained model measures noise)")
        if self.weights and not Path(self.weights).is_file():
            raise VitfabError(f"weights file not found: {self.weights}")
        if self.checkpoint and not Path(self.checkpoint).exists():
            raise VitfabError(f"checkpoint not found: {self.checkpoint}")
        if self.data is None or not Path(self.data).is_dir():
            raise DataError(f"data folder not found: {self.data}")
        for r in self.schedules:
            parse_tome_spec(r)
        self.precisions  # noqa: B018 -- parses them
        if self.max_images is not None and self.max_images < 1:
            raise VitfabError("--max-images must be at least 1")

    def configs(self) -> list[tuple[str, str]]:
        return [(r, p) for p in self.precisions for r in self.schedules]

    def default_out(self) -> Path:
        return Path("runs") / f"sweep-{self.model or Path(str(self.checkpoint)).name}"


def config_key(r: str, precision: str) -> str:
    return f"r={r} {precision}"


def load_base(cfg: SweepConfig):
    if cfg.checkpoint:
        return load_model(cfg.checkpoint, "cpu")
    return create_model(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, pretrained=cfg.pretrained,
                        weights=cfg.weights).eval()


def merged_copy(base, r: str):
    """A copy of ``base`` with the ToMe setting ``r`` (``base`` itself stays as it is)."""
    return apply_spec(copy.deepcopy(base), parse_tome_spec(r))


def _settings_check(cfg: SweepConfig, out: Path) -> None:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("tome_r", "precision", "device")}
    settings_path = out / "settings.json"
    if settings_path.is_file() and read_json(settings_path) != json.loads(json.dumps(settings)):
        raise VitfabError(f"{out} holds a sweep with other settings (model, data, subset); use another --out")
    write_json_atomic(settings_path, settings)


def _done(results_path: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def run_sweep(cfg: SweepConfig, out: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Every (r, precision): top-1 on the folder (resumable), then img/s interleaved; writes
    results.jsonl, sweep.json, sweep.csv and sweep.png into ``out``."""
    cfg.validate()
    device = resolve_device(cfg.device)
    for p in cfg.precisions:
        reason = unsupported_reason(Precision(p), device)
        if reason:
            raise VitfabError(f"--precision {p}: {reason}")
    base = load_base(cfg)
    index = scan_checked(cfg.data, progress=progress, classes=base.vitfab_meta.classes,
                         max_pixels=cfg.max_image_pixels)
    samples = list(index.samples)
    if not samples:
        raise DataError(f"no images of the model's classes in {cfg.data}")
    if cfg.max_images is not None and cfg.max_images < len(samples):
        samples = sorted(random.Random(cfg.seed).sample(samples, cfg.max_images))
    out = Path(out) if out is not None else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        _settings_check(cfg, out)
        results_path = out / "results.jsonl"
        done = _done(results_path)
        todo = [(r, p) for r, p in cfg.configs() if config_key(r, p) not in done]
        if done:
            console.print(f"resuming the sweep in {out}: {len(done)} configuration(s) already measured")
        loader = make_eval_loader(index.root, samples, base.vitfab_meta.preprocess, cfg.batch_size)
        with make_progress(progress) as bar:
            task = bar.add_task("sweep: accuracy", total=len(cfg.configs()), completed=len(cfg.configs()) - len(todo),
                                info=f"{len(samples)} images")
            for r, p in todo:
                model = prepare_model(merged_copy(base, r), p, device)
                acc = validation_accuracy(model, loader, device, Precision(p))
                rec = {"key": config_key(r, p), "tome_r": r, "precision": p, "top1": acc, "images": len(samples)}
                with open(results_path, "a") as fh:  # one line per finished configuration: the resume point
                    fh.write(json.dumps(rec) + "\n")
                done[rec["key"]] = rec
                bar.update(task, advance=1, info=f"{rec['key']}: {100 * acc:.2f} %")
        rows = measure_sweep_speed(cfg, base, [done[config_key(r, p)] for r, p in cfg.configs()], device, progress)
        write_json_atomic(out / "sweep.json", {"model": base.vitfab_meta.name, "data": str(cfg.data), "device":
                                               str(device), "rows": rows})
        with atomic_path(out / "sweep.csv") as tmp:
            keys = ["tome_r", "precision", "top1", "gmacs", "img_per_s", "speedup", "latency_ms_p50", "images"]
            tmp.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
        plot_sweep(rows, out / "sweep.png", base.vitfab_meta.name)
        return rows


def measure_sweep_speed(cfg: SweepConfig, base, records: list[dict[str, Any]], device: torch.device,
                        progress: bool) -> list[dict[str, Any]]:
    size = base.vitfab_meta.preprocess.img_size
    bs = default_batch(device)
    items, macs = [], []
    for rec in records:
        merged = merged_copy(base, rec["tome_r"])
        macs.append(count_macs(merged))
        items.append(Timed(prepare_model(merged, rec["precision"], device), (size, size), bs))
    speeds = measure_speed(items, device, cfg.repeats, cfg.min_repeat_seconds, latency_runs=20, progress=progress,
                           label="sweep")
    ref = speeds[0].img_per_s
    return [rec | {"gmacs": round(mc / 1e9, 4), "img_per_s": round(s.img_per_s, 2),
                   "speedup": round(s.img_per_s / ref, 3), "latency_ms_p50": round(s.latency_ms_p50, 3),
                   "batch_size": bs}
            for rec, mc, s in zip(records, macs, speeds)]


def plot_sweep(rows: list[dict[str, Any]], path: Path, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in dict.fromkeys(r["precision"] for r in rows):
        pts = [r for r in rows if r["precision"] == p]
        ax.plot([r["img_per_s"] for r in pts], [100 * r["top1"] for r in pts], "-o", label=p)
        for r in pts:
            ax.annotate(f"r={r['tome_r']}", (r["img_per_s"], 100 * r["top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("img/s")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{name}: ToMe r x precision, off the shelf")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
