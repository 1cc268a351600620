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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, VitfabError
from ..files import atomic_path, read_json, write_json_atomic
from ..progress import console, make_progress
from .bench import DEFAULT_BATCH, apply_token_merging, parse_tome_spec


@dataclass
class SweepConfig:
    data: str
    model: str | None = None  # timm name (with pretrained or weights) ...
    pretrained: bool = False
    weights: str | None = None
    checkpoint: str | None = None  # ... or a vitfab checkpoint (e.g. an extracted AutoFormer subnet)
    img_size: int | None = None
    patch_size: int | None = None
    tome_r: list[str] = field(default_factory=lambda: ["0", "4", "8", "12", "16"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    max_images: int | None = None  # a seeded subset (per folder order) for quick looks
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    repeats: int = 5
    min_repeat_seconds: float = 1.0

    def validate(self) -> None:
        from ..precision import parse_precision

        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
        if self.model is not None and not (self.pretrained or self.weights):
            raise VitfabError("--model needs --pretrained or --weights PATH (an untrained model measures noise)")
        if self.weights and not Path(self.weights).is_file():
            raise VitfabError(f"weights file not found: {self.weights}")
        if self.checkpoint and not Path(self.checkpoint).exists():
            raise VitfabError(f"checkpoint not found: {self.checkpoint}")
        if not Path(self.data).is_dir():
            raise DataError(f"data folder not found: {self.data}")
        if not self.tome_r or not self.precisions:
            raise VitfabError("--tome-r and --precision need at least one value each")
        for r in self.tome_r:
            parse_tome_spec(r)
        self.precisions = [parse_precision(p, allow_auto=False).value for p in self.precisions]
        if self.max_images is not None and self.max_images < 1:
            raise VitfabError("--max-images must be at least 1")

    def configs(self) -> list[tuple[str, str]]:
        return [(r, p) for p in self.precisions for r in self.tome_r]


def config_key(r: str, precision: str) -> str:
    return f"r={r} {precision}"


def load_base(cfg: SweepConfig):
    from ..models import create_model, load_model

    if cfg.checkpoint:
        return load_model(cfg.checkpoint, "cpu")
    return create_model(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, pretrained=cfg.pretrained,
                        weights=cfg.weights).eval()


def run_sweep(cfg: SweepConfig, out: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Every (r, precision): top-1 on the folder (resumable), then img/s interleaved; writes
    results.jsonl, sweep.json, sweep.csv and sweep.png into ``out``."""
    from ..data.images import scan_checked
    from ..evaluate.runner import make_eval_loader
    from ..precision import Precision, prepare_model, unsupported_reason, validation_accuracy
    from ..runtime import resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    for p in cfg.precisions:
        reason = unsupported_reason(Precision(p), device)
        if reason:
            raise VitfabError(f"--precision {p}: {reason}")
    base = load_base(cfg)
    classes = base.vitfab_meta.classes
    index = scan_checked(cfg.data, progress=progress, classes=classes)
    samples = list(index.samples)
    if not samples:
        raise DataError(f"no images of the model's classes in {cfg.data}")
    if cfg.max_images is not None and cfg.max_images < len(samples):
        samples = sorted(random.Random(cfg.seed).sample(samples, cfg.max_images))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("tome_r", "precisions", "device")}
    settings_path = out / "settings.json"
    if settings_path.is_file() and read_json(settings_path) != json.loads(json.dumps(settings)):
        raise VitfabError(f"{out} holds a sweep with other settings (model, data, subset); use another --out")
    write_json_atomic(settings_path, settings)
    results_path = out / "results.jsonl"
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    todo = [(r, p) for r, p in cfg.configs() if config_key(r, p) not in done]
    if done:
        console.print(f"resuming the sweep in {out}: {len(done)} configuration(s) already measured")
    loader = make_eval_loader(index.root, samples, base.vitfab_meta.preprocess, cfg.batch_size)
    with make_progress(progress) as bar:
        task = bar.add_task("sweep: accuracy", total=len(cfg.configs()), completed=len(cfg.configs()) - len(todo),
                            info=f"{len(samples)} images")
        for r, p in todo:
            model = prepare_model(apply_token_merging(copy.deepcopy(base), parse_tome_spec(r)), p, device)
            acc = validation_accuracy(model, loader, device, Precision(p))
            rec = {"key": config_key(r, p), "tome_r": r, "precision": p, "top1": acc, "images": len(samples)}
            with open(results_path, "a") as fh:  # one line per finished configuration: the resume point
                fh.write(json.dumps(rec) + "\n")
            done[rec["key"]] = rec
            bar.update(task, advance=1, info=f"{rec['key']}: {100 * acc:.2f} %")
    rows = measure_speed(cfg, base, [done[config_key(r, p)] for r, p in cfg.configs()], device, progress)
    write_json_atomic(out / "sweep.json", {"model": base.vitfab_meta.name, "data": str(cfg.data), "device":
                                           str(device), "rows": rows})
    with atomic_path(out / "sweep.csv") as tmp:
        keys = ["tome_r", "precision", "top1", "gmacs", "img_per_s", "speedup", "latency_ms_p50", "images"]
        tmp.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    plot_sweep(rows, out / "sweep.png", base.vitfab_meta.name)
    return rows


def measure_speed(cfg: SweepConfig, base, records: list[dict[str, Any]], device: torch.device,
                  progress: bool) -> list[dict[str, Any]]:
    from ..precision import prepare_model
    from .counts import count_macs
    from .timing import interleaved_latency, interleaved_throughput, median

    size = base.vitfab_meta.preprocess.img_size
    bs = DEFAULT_BATCH.get(device.type, 16)
    x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    models, macs = [], []
    for rec in records:
        merged = apply_token_merging(copy.deepcopy(base), parse_tome_spec(rec["tome_r"]))
        macs.append(count_macs(merged))
        models.append(prepare_model(merged, rec["precision"], device))
    with make_progress(progress) as bar, torch.inference_mode():
        t = bar.add_task("sweep: throughput", total=cfg.repeats, info=f"{len(models)} interleaved")
        speeds = interleaved_throughput([(lambda m=m: m(x)) for m in models], [bs] * len(models), device, cfg.repeats,
                                        cfg.min_repeat_seconds, on_round=lambda: bar.advance(t))
        lat = interleaved_latency([(lambda m=m: m(x[:1])) for m in models], device, 20)
    ref = median(speeds[0])
    return [rec | {"gmacs": round(mc / 1e9, 4), "img_per_s": round(median(s), 2), "speedup": round(median(s) / ref, 3),
                   "latency_ms_p50": round(median(lt), 3), "batch_size": bs}
            for rec, mc, s, lt in zip(records, macs, speeds, lat)]


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
