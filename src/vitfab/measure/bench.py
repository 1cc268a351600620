"""``vitfab bench``: measure one or more configurations in one process, interleaved.

A configuration is a model (timm name or vitfab checkpoint) x precision x ToMe schedule x batch
size. MACs are counted after token merging is applied, so its savings are measured.
All of them are loaded first, then timed in rounds (A B C A B C ...), so that drift on a shared
machine hits every configuration alike; ratios against the first are the numbers to quote.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import VitfabError
from ..evaluate.api import labelled_samples
from ..precision import (AUTO, Precision, check_finite, parse_precision, prepare_model, select_precision,
                         validation_accuracy)
from .. import tome
from ..progress import make_progress
from ..tome import Schedule
from .counts import count_macs, count_params, input_size
from .energy import EnergyResult, measure_energy
from .measurement import Measurement, device_name
from .memory import peak_memory, weights_bytes
from .timing import interleaved_latency, interleaved_throughput, median, percentiles

DEFAULT_BATCH = {"cpu": 16, "cuda": 256}
RECORDED = "recorded"  # --tome-r: the schedule saved with the checkpoint


@dataclass
class BenchConfig:
    model: str | None = None  # timm name (random weights: speed does not depend on them)
    checkpoint: str | None = None  # vitfab checkpoint or run folder
    precision: str = "fp32"
    tome_r: str | None = None  # ToMe schedule (8, 16:-1, keep=0.5, ...); None: stock model, not patched
    batch_size: int | None = None  # default: 16 on CPU, 256 on CUDA
    img_size: int | None = None  # timm names only; a checkpoint runs at its own size
    method: str = "cast"  # fp16/bf16: "cast" (low-precision weights) or "autocast"
    label: str | None = None
    runtime: str | None = None  # torch | onnxruntime; None: onnxruntime for an .onnx file, else torch

    FIELDS = ("model", "checkpoint", "precision", "tome_r", "batch_size", "img_size", "method", "label", "runtime")

    @property
    def resolved_runtime(self) -> str:
        if self.runtime is not None:
            return self.runtime
        return "onnxruntime" if self.checkpoint is not None and str(self.checkpoint).endswith(".onnx") else "torch"

    def validate(self) -> None:
        if (self.model is None) == (self.checkpoint is None):
            raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
        parse_precision(self.precision)
        if self.tome_r not in (None, RECORDED):
            Schedule.parse(self.tome_r)
        if self.batch_size is not None and self.batch_size < 1:
            raise VitfabError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.img_size is not None and self.checkpoint is not None:
            raise VitfabError("--img-size applies to --model; a checkpoint runs at the size it was trained at")
        rt = self.resolved_runtime
        if rt not in ("torch", "onnxruntime"):
            raise VitfabError(f"runtime must be torch or onnxruntime, got '{rt}'")
        if rt == "onnxruntime":
            if self.checkpoint is None:
                raise VitfabError("the onnxruntime runtime runs an exported model: give a deploy folder or .onnx file")
            if self.tome_r not in (None, RECORDED):
                raise VitfabError("an exported model's ToMe schedule is fixed in its graph: drop --tome-r for onnxruntime")
            if self.precision not in ("fp32", "int8"):
                raise VitfabError(f"onnxruntime runs fp32 or int8 here, not {self.precision}")
        elif self.checkpoint is not None and str(self.checkpoint).endswith(".onnx"):
            raise VitfabError(f"{self.checkpoint} is an ONNX file: it runs with runtime=onnxruntime")

    def with_overrides(self, spec: str) -> "BenchConfig":
        """A copy with ``key=value[,key=value]`` applied (the ``--vs`` syntax)."""
        changes: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in self.FIELDS:
                raise VitfabError(f"--vs expects KEY=VALUE with KEY in {', '.join(self.FIELDS)}; got '{item}'")
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
        if self.resolved_runtime == "onnxruntime":
            parts.append("onnxruntime")
        if self.tome_r == RECORDED or (self.tome_r is None and self.resolved_runtime == "onnxruntime"):
            parts.append("ToMe as saved")
        elif self.tome_r is not None:
            parts.append(Schedule.parse(self.tome_r).describe())
        return " ".join(parts)


def parse_tome_spec(value: str) -> str | None:
    """``none``/``stock``/``off`` -> None (the stock model); ``recorded`` -> the schedule saved with
    the checkpoint, as it is; anything else is a ToMe schedule."""
    value = value.strip()
    if value.lower() in ("none", "stock", "off"):
        return None
    if value.lower() == RECORDED:
        return RECORDED
    Schedule.parse(value)
    return value


def apply_token_merging(model: nn.Module, spec: str | None) -> nn.Module:
    """The schedule ``spec``, the stock model (merging removed, also from a checkpoint saved
    with it) for None, the model as loaded for ``recorded``."""
    if spec == RECORDED:
        return model
    if spec is None:
        return tome.remove(model)
    return tome.apply(model, spec)


def load_fp32_model(cfg: BenchConfig) -> nn.Module:
    from ..models import create_model, load_model

    if cfg.checkpoint is not None:
        if str(cfg.checkpoint).endswith(".onnx"):
            from ..export.runtime import torch_twin

            return torch_twin(cfg.checkpoint)
        return load_model(cfg.checkpoint, "cpu")
    return create_model(cfg.model, img_size=cfg.img_size).eval()


@dataclass
class _Prepared:
    cfg: BenchConfig
    precision: Precision
    model: nn.Module
    x: torch.Tensor
    x1: torch.Tensor
    params: int
    macs: int
    img_size: int
    name: str
    accuracy: float | None = None
    accuracy_on: str | None = None
    weights_mb: float = 0.0
    tome: dict | None = None


def _prepare(cfg: BenchConfig, device: torch.device, data, split: str, tolerance: float, progress: bool,
             samples_cache: dict) -> _Prepared:
    from ..evaluate.runner import make_eval_loader

    cfg.validate()
    base = load_fp32_model(cfg)
    ort = cfg.resolved_runtime == "onnxruntime"
    if not ort:  # an exported graph keeps the schedule it was exported with
        base = apply_token_merging(base, cfg.tome_r)
    h, w = input_size(base)
    params, macs = count_params(base), count_macs(base)
    precision = parse_precision(cfg.precision)
    key = (cfg.checkpoint, str(data), split, tuple(base.vitfab_meta.classes))  # one scan per model and data
    if key not in samples_cache:
        samples_cache[key] = labelled_samples(base, cfg.checkpoint, data, progress, split)
    source = samples_cache[key]
    loader = None
    if source is not None:
        root, samples, desc = source
        loader = make_eval_loader(root, samples, base.vitfab_meta.preprocess, batch_size=64)
    if precision == AUTO:
        if loader is None:
            raise VitfabError("--precision auto checks accuracy: give --data DIR or a run folder as --checkpoint")
        val_loader = loader  # choose on validation data, report top-1 on the split asked for
        if data is None and split != "val":
            val = labelled_samples(base, cfg.checkpoint, None, False, "val")
            if val is None:
                raise VitfabError("--precision auto chooses on the validation split, and this run has none")
            val_loader = make_eval_loader(val[0], val[1], base.vitfab_meta.preprocess, batch_size=64)
        choice = select_precision(base, val_loader, device, tolerance, progress=progress)
        precision = choice.precision
    if ort:
        from ..export.runtime import OrtModel

        model = OrtModel(cfg.checkpoint, device, precision.value)
    else:
        model = prepare_model(base, precision, device, cfg.method)
    bs = cfg.batch_size or DEFAULT_BATCH.get(device.type, 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bs, 3, h, w, generator=gen).to(device)
    with torch.inference_mode():
        check_finite(model(x[:2]), precision, "a random input batch")
    p = _Prepared(cfg, precision, model, x, x[:1].clone(), params, macs, h, base.vitfab_meta.name,
                  weights_mb=(Path(model.run_path).stat().st_size if ort else weights_bytes(model)) / 2**20,
                  tome=tome.tome_info(base))
    if loader is not None:
        p.accuracy, p.accuracy_on = validation_accuracy(model, loader, device, precision), desc
    return p


def benchmark(
    configs: Sequence[BenchConfig],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    min_repeat_seconds: float = 1.0,
    latency_runs: int = 50,
    energy: bool = True,
    energy_seconds: float = 3.0,
    threads: int | None = None,
    data: str | Path | None = None,
    split: str = "val",
    tolerance: float = 0.01,
    progress: bool = True,
) -> list[Measurement]:
    """Measure every configuration; throughput and latency interleaved across them."""
    if not configs:
        raise VitfabError("nothing to benchmark")
    if split not in ("train", "val", "test", "all"):
        raise VitfabError(f"--split must be train, val, test or all, got '{split}'")
    if repeats < 1 or latency_runs < 1:
        raise VitfabError("--repeats and --latency-runs must be at least 1")
    device = torch.device(device)
    if threads is not None:
        if threads < 1:
            raise VitfabError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    cache: dict = {}
    prepared = [_prepare(c, device, data, split, tolerance, progress, cache) for c in configs]
    fns = [(lambda p=p: p.model(p.x)) for p in prepared]
    fns1 = [(lambda p=p: p.model(p.x1)) for p in prepared]
    n = len(prepared)
    with make_progress(progress) as bar, torch.inference_mode():
        t = bar.add_task("throughput", total=repeats, info=f"{n} configs interleaved")
        speeds = interleaved_throughput(fns, [len(p.x) for p in prepared], device, repeats, min_repeat_seconds,
                                        on_round=lambda: bar.advance(t))
        t = bar.add_task("latency (batch 1)", total=latency_runs, info="")
        lat = interleaved_latency(fns1, device, latency_runs, on_round=lambda: bar.advance(t))
        t = bar.add_task("memory", total=n, info="")
        mem = []
        for fn in fns:
            mem.append(peak_memory(fn, device))
            bar.advance(t)
        joules = []
        t = bar.add_task("energy", total=n, info=f">= {energy_seconds:.0f} s each" if energy else "off")
        for p, fn in zip(prepared, fns):
            joules.append(measure_energy(fn, len(p.x), device, min_seconds=energy_seconds) if energy
                          else EnergyResult(None, "unavailable", "energy measurement switched off (--no-energy)"))
            bar.advance(t)
    out = []
    for p, s, l, (mb, kind), e in zip(prepared, speeds, lat, mem, joules):
        out.append(Measurement(
            label=p.cfg.describe(p.precision.value), model=p.name, precision=p.precision.value, device=str(device),
            device_name=device_name(device), batch_size=len(p.x), img_size=p.img_size,
            threads=torch.get_num_threads(), params=p.params, macs=p.macs, img_per_s=median(s),
            img_per_s_runs=[round(v, 3) for v in s], latency_ms=percentiles(l), peak_memory_mb=mb,
            memory_kind=kind, weights_mb=p.weights_mb, energy=e, tome=p.tome,
            accuracy=p.accuracy, accuracy_on=p.accuracy_on,
        ))
    return out


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
