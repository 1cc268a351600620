"""``vitfab bench``: measure one or more configurations in one process, interleaved.

A configuration (``BenchConfig``) is a model (timm name, vitfab checkpoint or exported model) x
runtime x precision x ToMe schedule x batch size. MACs are counted after token merging is
applied, so its savings are measured. All of them are loaded first, then timed together by
``measure_speed`` (rounds A B C A B C ...), so that drift on a shared machine hits every
configuration alike; ratios against the first are the numbers to quote.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.images import max_pixels_option
from ..errors import VitfabError
from ..evaluate.accuracy import validation_accuracy
from ..evaluate.api import labelled_samples
from ..evaluate.runner import image_batches, make_eval_loader
from ..models import create_model
from ..options import RECORDED, option, split_list
from ..precision import AUTO, DEFAULT_TOLERANCE, Precision, check_finite, parse_precision, prepare_model
from ..progress import make_progress
from ..rundir import kind_of
from ..runtime import resolve_device
from ..runtimes import (CALIBRATION_IMAGES, RUNTIMES, STATIC_INT8, Deployed, convert, load_model,
                        model_for_counting)
from ..tome import Schedule, apply_spec, parse_tome_spec, tome_info
from .auto_precision import select_precision
from .counts import count_macs, count_params, input_size
from .energy import EnergyResult
from .measurement import Measurement, device_name
from .memory import peak_memory, weights_bytes
from .speed import Timed, default_batch, measure_speed, seeded_batch

SPLITS = ("train", "val", "test", "all")


@dataclass
class BenchConfig:
    """One configuration to measure."""

    model: str | None = None  # timm name (random weights: speed does not depend on them)
    checkpoint: str | None = None  # vitfab checkpoint, run folder, deploy folder or .onnx file
    precision: str = "fp32"
    tome_r: str | None = None  # ToMe schedule (8, 16:-1, keep=0.5, recorded, ...); None: stock model, not patched
    batch_size: int | None = None  # default: 16 on CPU, 256 on CUDA
    img_size: int | None = None  # timm names only; a checkpoint runs at its own size
    method: str = "cast"  # fp16/bf16: "cast" (low-precision weights) or "autocast"
    label: str | None = None
    runtime: str | None = None  # one of RUNTIMES; None: onnxruntime for an .onnx file, openvino for .xml, else torch

    @property
    def resolved_runtime(self) -> str:
        if self.runtime is not None:
            return self.runtime
        suffix = Path(self.checkpoint).suffix if self.checkpoint is not None else ""
        return {".onnx": "onnxruntime", ".xml": "openvino"}.get(suffix, "torch")

    @property
    def exported(self) -> bool:
        """An artifact of ``vitfab export`` (a deploy folder or a graph file) run outside PyTorch."""
        if self.resolved_runtime == "torch" or self.checkpoint is None:
            return False
        p = Path(self.checkpoint)
        return p.suffix in (".onnx", ".xml") or kind_of(p) == "deploy"

    def validate(self) -> None:
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
        parse_precision(self.precision)
        parse_tome_spec(self.tome_r)
        if self.batch_size is not None and self.batch_size < 1:
            raise VitfabError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.img_size is not None and self.checkpoint is not None:
            raise VitfabError("--img-size applies to --model; a checkpoint runs at the size it was trained at")
        rt = self.resolved_runtime
        if rt not in RUNTIMES:
            raise VitfabError(f"runtime must be one of {', '.join(RUNTIMES)}, got '{rt}'")
        graph = self.checkpoint is not None and Path(self.checkpoint).suffix in (".onnx", ".xml")
        if rt != "torch":
            if self.checkpoint is None:
                raise VitfabError(f"the {rt} runtime runs a trained model: give a checkpoint, run or deploy folder, "
                                  f"or an exported file")
            if self.exported and self.tome_r not in (None, RECORDED):
                raise VitfabError(f"an exported model's ToMe schedule is fixed in its graph: drop --tome-r for {rt}")
            if self.precision not in ("fp32", "fp16", "bf16", "int8"):
                raise VitfabError(f"{rt} runs fp32, bf16 or int8, not {self.precision}")
        elif graph:
            raise VitfabError(f"{self.checkpoint} is an exported graph: it runs with runtime=onnxruntime or openvino")

    def with_overrides(self, spec: str) -> "BenchConfig":
        """A copy with ``key=value[,key=value]`` applied (the ``--vs`` syntax)."""
        names = [f.name for f in dataclasses.fields(self)]
        changes: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in names:
                raise VitfabError(f"--vs expects KEY=VALUE with KEY in {', '.join(names)}; got '{item}'")
            if key == "tome_r":
                changes[key] = parse_tome_spec(value)
            elif key in ("batch_size", "img_size"):
                try:
                    changes[key] = int(value)
                except ValueError:
                    raise VitfabError(f"--vs {key} needs an integer, got '{value}'") from None
            else:
                changes[key] = value
        if "model" in changes:
            changes.setdefault("checkpoint", None)
        if "checkpoint" in changes:
            changes.setdefault("model", None)
            changes.setdefault("img_size", None)
        changes.setdefault("label", None)
        return dataclasses.replace(self, **changes)

    def describe(self, resolved: str | None = None) -> str:
        """The row label; ``resolved``: the mode that ``auto`` chose."""
        if self.label:
            return self.label
        name = self.model or Path(self.checkpoint).name
        name = name.replace("_patch16_224", "").replace("_224", "")
        mode = f"auto->{resolved}" if self.precision == AUTO and resolved else self.precision
        parts = [name, mode if self.method == "cast" else f"{mode}-autocast"]
        if self.resolved_runtime != "torch":
            parts.append(self.resolved_runtime)
        if self.tome_r == RECORDED or (self.tome_r is None and self.exported):
            parts.append("ToMe as saved")
        elif self.tome_r is not None:
            parts.append(Schedule.parse(self.tome_r).describe())
        return " ".join(parts)


@dataclass
class BenchRequest:
    """``vitfab bench``'s configurations: a model, comma lists of precisions and ToMe settings
    (every combination), and ``--vs`` variations of the first."""

    model: str | None = option(None, help="timm model name (random weights; speed does not depend on them).")
    checkpoint: str | None = option(None, help="A vitfab checkpoint, run folder, deploy folder or .onnx file.")
    precision: str = option("fp32", help="fp32, fp16, bf16, int8 or auto; a comma list compares several.")
    tome_r: str | None = option(None, help="ToMe schedule: R, R:INFLECTION (16:-1 = decreasing), R1/R2/... per "
                                           "layer, keep=F, macs=F, or none (stock model), recorded (as saved with "
                                           "the checkpoint); a comma list compares several [default: none].")
    runtime: str | None = option(None, help="torch, onnxruntime, openvino or tensorrt; a checkpoint is converted "
                                            "for the run (int8 calibrated on --data or the run's training split), a "
                                            "deploy folder runs its exported files [default: onnxruntime for .onnx, "
                                            "openvino for .xml, else torch].")
    batch_size: int | None = option(None, help="Throughput batch [default: 16 on CPU, 256 on CUDA].")
    img_size: int | None = option(None, help="With --model: input size override.")
    vs: list[str] = option(default_factory=list, help="Another configuration, KEY=VALUE[,KEY=VALUE] changed from "
                                                      "the first (keys: the fields of BenchConfig); repeatable.")

    def configs(self) -> list[BenchConfig]:
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
        schedules = [parse_tome_spec(v) for v in split_list(self.tome_r, "--tome-r")] if self.tome_r else [None]
        base = BenchConfig(model=self.model, checkpoint=self.checkpoint, batch_size=self.batch_size,
                           img_size=self.img_size, runtime=self.runtime)
        configs = [dataclasses.replace(base, precision=p, tome_r=r)
                   for p in split_list(self.precision, "--precision") for r in schedules]
        configs += [configs[0].with_overrides(spec) for spec in self.vs]
        for c in configs:
            c.validate()
        return configs


@dataclass
class BenchOptions:
    """How ``benchmark`` measures."""

    device: str = option("auto", help="cpu, cuda or auto.")
    data: str | None = option(None, help="Labelled folder: also measure top-1 of each configuration.")
    max_image_pixels: int = max_pixels_option()
    split: str = option("val", help="With a run folder as --checkpoint: the split to measure top-1 on.")
    tolerance: float = option(DEFAULT_TOLERANCE, help="--precision auto: allowed top-1 drop vs fp32 (0.01 = one point).")
    repeats: int = option(5, help="Throughput repeats per configuration (median reported).")
    min_repeat_seconds: float = option(1.0, help="Each throughput repeat lasts at least this long.")
    latency_runs: int = option(50, help="Batch-1 calls per configuration for the latency percentiles.")
    energy: bool = option(True, help="Measure J/img with NVML (GPU) or RAPL (CPU) where readable.")
    energy_seconds: float = option(3.0, help="Energy window per configuration.")
    threads: int | None = option(None, help="torch CPU threads during the measurement [default: torch's choice].")

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise VitfabError(f"--split must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.repeats < 1 or self.latency_runs < 1:
            raise VitfabError("--repeats and --latency-runs must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise VitfabError(f"--threads must be >= 1, got {self.threads}")


def load_fp32_model(cfg: BenchConfig) -> nn.Module:
    """The configuration's model in fp32, as loaded (a checkpoint with its recorded ToMe schedule;
    an exported graph's architecture, for counting)."""
    if cfg.checkpoint is not None:
        if Path(cfg.checkpoint).suffix in (".onnx", ".xml"):
            return model_for_counting(cfg.checkpoint)
        return load_model(cfg.checkpoint, "cpu")
    return create_model(cfg.model, img_size=cfg.img_size).eval()


def torch_model(cfg: BenchConfig, precision: str, device: str) -> nn.Module:
    """The configuration in PyTorch, prepared (what a timing worker builds)."""
    return prepare_model(apply_spec(load_fp32_model(cfg), cfg.tome_r), precision, device, cfg.method)


def deployed_for(cfg: BenchConfig, base: nn.Module, precision: str, opts: BenchOptions, cache: dict) -> Deployed:
    """What the configuration's runtime runs: its exported files, or ``base`` converted (int8
    calibrated on ``--data`` or the run's training split)."""
    rt = cfg.resolved_runtime
    if cfg.exported:
        return Deployed(rt, precision, str(cfg.checkpoint))
    folder = cache.setdefault(("convert", cfg.checkpoint, cfg.tome_r), Path(cache["workdir"]) / f"m{len(cache)}")
    calibration = cache.get("calibration")  # a caller's own set (the main job's training images)
    if precision == "int8" and rt in STATIC_INT8 and calibration is None:
        source = labelled_samples(base, cfg.checkpoint, opts.data, False, "train", opts.max_image_pixels)
        if source is None:
            raise VitfabError(f"{rt} int8 is calibrated on images: give --data DIR or a run folder as --checkpoint")
        calibration = image_batches(source[0], source[1], base.vitfab_meta.preprocess, CALIBRATION_IMAGES)
    return Deployed(rt, precision, str(convert(base, rt, precision, folder, calibration)))


@dataclass
class _Prepared:
    cfg: BenchConfig
    precision: Precision
    model: nn.Module
    batch_size: int
    params: int
    macs: int
    input_size: tuple[int, int]
    name: str
    weights_mb: float
    tome: dict | None
    accuracy: float | None = None
    accuracy_on: str | None = None
    build: Any = None  # a picklable call that makes ``model`` again (in a timing worker)


def _loader_for(base, cfg: BenchConfig, opts: BenchOptions, progress: bool, cache: dict, subset: str):
    key = (cfg.checkpoint, str(opts.data), subset, tuple(base.vitfab_meta.classes))  # one scan per model and data
    if key not in cache:
        cache[key] = labelled_samples(base, cfg.checkpoint, opts.data, progress, subset, opts.max_image_pixels)
    source = cache[key]
    if source is None:
        return None, None
    root, samples, desc = source
    return make_eval_loader(root, samples, base.vitfab_meta.preprocess, batch_size=64), desc


def _resolve_auto(base, cfg: BenchConfig, device, opts: BenchOptions, loader, progress: bool, cache) -> Precision:
    """``--precision auto``: chosen on validation data, whatever split the top-1 is reported on."""
    if loader is None:
        raise VitfabError("--precision auto checks accuracy: give --data DIR or a run folder as --checkpoint")
    val_loader = loader
    if opts.data is None and opts.split != "val":
        val_loader, _ = _loader_for(base, cfg, opts, False, cache, "val")
        if val_loader is None:
            raise VitfabError("--precision auto chooses on the validation split, and this run has none")
    return select_precision(base, val_loader, device, opts.tolerance, progress=progress).precision


def _prepare(cfg: BenchConfig, device: torch.device, opts: BenchOptions, progress: bool, cache: dict) -> _Prepared:
    cfg.validate()
    base = load_fp32_model(cfg)
    if not cfg.exported:  # an exported graph keeps the schedule it was exported with
        base = apply_spec(base, cfg.tome_r)
    params, macs = count_params(base), count_macs(base)
    precision = parse_precision(cfg.precision)
    loader, desc = _loader_for(base, cfg, opts, progress, cache, opts.split)
    if precision == AUTO:
        precision = _resolve_auto(base, cfg, device, opts, loader, progress, cache)
    if cfg.resolved_runtime == "torch":
        model = prepare_model(base, precision, device, cfg.method)
        build = partial(torch_model, cfg, precision.value, str(device))
    else:
        deployed = deployed_for(cfg, base, precision.value, opts, cache)
        model, build = deployed.build(device, opts.threads), partial(deployed.build, str(device), opts.threads)
    bs = cfg.batch_size or default_batch(device)
    size = input_size(base)
    with torch.inference_mode():
        check_finite(model(seeded_batch(2, size, device)), precision, "a random input batch")
    p = _Prepared(cfg, precision, model, bs, params, macs, size, base.vitfab_meta.name,
                  (getattr(model, "file_bytes", None) or weights_bytes(model)) / 2**20, tome_info(base), build=build)
    if loader is not None:
        p.accuracy, p.accuracy_on = validation_accuracy(model, loader, device, precision), desc
    return p


def benchmark(configs: Sequence[BenchConfig], options: BenchOptions | None = None,
              progress: bool = True, cache: dict | None = None) -> list[Measurement]:
    """Measure every configuration; throughput and latency interleaved across them. ``cache``: a
    caller's ``{"workdir": folder, "calibration": batches}`` for converted models, kept across calls
    (default: a temporary folder; int8 calibrated on ``--data`` or the run's training split)."""
    opts = options or BenchOptions()
    if not configs:
        raise VitfabError("nothing to benchmark")
    opts.validate()
    device = resolve_device(opts.device)
    if cache is not None:
        return _measure([_prepare(c, device, opts, progress, cache) for c in configs], device, opts, progress)
    with tempfile.TemporaryDirectory(prefix="vitfab-bench-") as work:
        own = {"workdir": work}
        return _measure([_prepare(c, device, opts, progress, own) for c in configs], device, opts, progress)


def _measure(prepared: Sequence[_Prepared], device: torch.device, opts: BenchOptions, progress: bool) -> list[Measurement]:
    """Speed (each runtime's pool in a worker of its own where several runtimes are compared),
    memory and energy of every prepared configuration."""
    items = [Timed(p.model, p.input_size, p.batch_size, build=p.build, pool=p.cfg.resolved_runtime) for p in prepared]
    isolate = len({it.pool for it in items}) > 1
    with make_progress(progress) as bar:
        speeds = measure_speed(items, device, opts.repeats, opts.min_repeat_seconds, opts.latency_runs,
                               opts.energy_seconds if opts.energy else None, opts.threads, progress=bar,
                               isolate=isolate)
        t = bar.add_task("memory", total=len(items), info="")
        mem = []
        for p in prepared:
            x = seeded_batch(p.batch_size, p.input_size, device)
            with torch.inference_mode():
                mem.append(peak_memory(lambda p=p, x=x: p.model(x), device))
            bar.advance(t)
    off = EnergyResult(None, "unavailable", "energy measurement switched off (--no-energy)")
    return [Measurement(
        label=p.cfg.describe(p.precision.value), model=p.name, precision=p.precision.value, device=str(device),
        device_name=device_name(device), batch_size=p.batch_size, img_size=p.input_size[0], threads=s.threads,
        params=p.params, macs=p.macs, img_per_s=s.img_per_s, img_per_s_runs=[round(v, 3) for v in s.img_per_s_runs],
        latency_ms=s.latency_ms, peak_memory_mb=mb, memory_kind=kind, weights_mb=p.weights_mb,
        energy=s.energy or off, tome=p.tome, accuracy=p.accuracy, accuracy_on=p.accuracy_on,
    ) for p, s, (mb, kind) in zip(prepared, speeds, mem)]


def ratios(measurements: Sequence[Measurement]) -> list[dict[str, float | None]]:
    """Each measurement against the first: >1 means better (faster, smaller, less energy)."""
    base = measurements[0]

    def div(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rows = []
    for m in measurements:
        rows.append({
            "label": m.label,
            "speedup": div(m.img_per_s, base.img_per_s),
            "latency_speedup": div(base.latency_ms["p50"], m.latency_ms["p50"]),
            "params_reduction": div(base.params, m.params),
            "macs_reduction": div(base.macs, m.macs),
            "energy_reduction": div(base.joules_per_img, m.joules_per_img),
            "accuracy_change_points": None if m.accuracy is None or base.accuracy is None
            else 100 * (m.accuracy - base.accuracy),
        })
    return rows


def bench_report(measurements: Sequence[Measurement]) -> dict[str, Any]:
    """The JSON form: device, each measurement, ratios against the first."""
    first = measurements[0]
    return {
        "device": first.device, "device_name": first.device_name, "threads": first.threads,
        "torch": first.torch_version, "measurements": [m.to_dict() for m in measurements],
        "ratios_vs_first": ratios(measurements),
    }
