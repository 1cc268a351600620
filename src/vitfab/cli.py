"""``vitfab`` command line: a thin typer layer over the Python API.

Every option of a command is a field of a config dataclass (``JobConfig``, ``TrainConfig``, ...),
with its type, default and help written once, there: ``command`` turns the fields into typer
options and the parsed values back into the config the API takes. A command here only picks the
configs, calls the API and prints the result. Modules behind the commands are imported when a
command runs, so that ``vitfab --help`` does not load them all.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from .data.images import ScanOptions
from .data.synth import SynthConfig
from .errors import VitfabError
from .evaluate.api import EvalConfig
from .evaluate.predict import PredictConfig
from .export.calibrate import CalibrateConfig
from .export.deploy import ExportConfig
from .measure.auto_precision import PrecisionRequest
from .measure.bench import BenchOptions, BenchRequest
from .measure.sweep import SweepConfig
from .nas.extract import ExtractRequest
from .nas.search import SearchConfig, SearchRequest
from .nas.train import SupernetConfig
from .optimize.config import JobConfig
from .options import opt_of
from .train.config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make Vision Transformers cheap enough for the inspection line. Errors are one "
                       "line; add --debug anywhere (or set VITFAB_DEBUG=1) for the traceback.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthesise, inspect.")
nas_app = typer.Typer(no_args_is_help=True, help="Architecture search (AutoFormer): train a supernet, search, extract.")
tome_app = typer.Typer(no_args_is_help=True, help="Token merging (ToMe): visualise merges.")
app.add_typer(data_app, name="data")
app.add_typer(nas_app, name="nas")
app.add_typer(tome_app, name="tome")
out_console = Console()  # results on stdout; progress and notes go to stderr


# --------------------------------------------------------------------------- configs as options
@dataclasses.dataclass(frozen=True)
class Extra:
    """A command option that is not a config field (where to write, --json, --progress)."""

    name: str
    type: Any
    info: Any  # typer.Option(...) or typer.Argument(...)


def _json(help_text: str = "Print the result as JSON.") -> Extra:
    return Extra("as_json", bool, typer.Option(False, "--json", help=help_text))


PROGRESS = Extra("progress", bool, typer.Option(True, "--progress/--no-progress", help="Show progress bars."))


def _out(help_text: str, required: bool = False) -> Extra:
    return Extra("out", Path if required else Optional[Path], typer.Option(... if required else None, help=help_text))


def _resume(what: str) -> Extra:
    return Extra("resume", Optional[Path], typer.Option(None, help=f"Continue this {what} after an interruption."))


def _cli_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return Optional[_cli_type(next(a for a in typing.get_args(tp) if a is not type(None)))]
    if origin is list:
        return List[typing.get_args(tp)[0]]
    return tp


def config_options(cls: type) -> list[tuple[str, Any, Any, Callable | None]]:
    """(name, type, typer option, parser) of every command-line field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    exclude = getattr(cls, "CLI_EXCLUDE", ())
    out = []
    for f in dataclasses.fields(cls):
        opt = opt_of(f)
        if opt is None or not opt.cli or f.name in exclude:
            continue
        tp = opt.cli_type if opt.cli_type is not None else hints[f.name]
        if opt.cli_type is not None:
            default = opt.cli_default
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        flag = opt.flag or f.name.replace("_", "-")
        decl = f"--{flag}/--no-{flag}" if tp is bool else f"--{flag}"
        out.append((f.name, _cli_type(tp), typer.Option(default, decl, help=opt.help), opt.parse))
    return out


COMMANDS: dict[tuple[str, ...], dict[str, type]] = {}  # command path -> {argument name: config class}


def build_configs(configs: dict[str, type], values: dict[str, Any]) -> dict[str, Any]:
    """The parsed option values as the config objects of a command."""
    built = {}
    for arg, cls in configs.items():
        kwargs = {}
        for name, _, _, parse in config_options(cls):
            value = values[name]
            kwargs[name] = parse(value) if parse is not None else (str(value) if isinstance(value, Path) else value)
        built[arg] = cls(**kwargs)
    return built


def command(group: typer.Typer, path: tuple[str, ...], configs: dict[str, type], extras: tuple[Extra, ...] = ()):
    """Register ``impl(**configs, **extras)`` as the command ``path``, its options made from ``configs``."""

    def register(impl):
        params = [(n, t, o) for cls in configs.values() for n, t, o, _ in config_options(cls)]
        params += [(e.name, e.type, e.info) for e in extras]

        def callback(**values):
            return impl(**build_configs(configs, values), **{e.name: values[e.name] for e in extras})

        callback.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t) for n, t, o in params])
        callback.__doc__, callback.__name__ = impl.__doc__, impl.__name__
        COMMANDS[path] = configs
        group.command(path[-1])(callback)
        return impl

    return register


def parse_configs(argv: list[str]) -> dict[str, Any]:
    """The config objects a command line would run with, without running it (for tests)."""
    group = typer.main.get_command(app)
    path, args = [], list(argv)
    while args and args[0] in getattr(group, "commands", {}):
        path.append(args[0])
        group = group.commands[args.pop(0)]
    ctx = group.make_context(path[-1], args)
    return build_configs(COMMANDS[tuple(path)], ctx.params)


# --------------------------------------------------------------------------- output
def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _say(text: str) -> None:
    out_console.print(text, highlight=False, soft_wrap=True)


def _fmt(v: float | None, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _print_metrics(m: dict[str, Any]) -> None:
    from .evaluate import format_metrics

    _say(format_metrics(m))
    if len(m.get("per_class", {})) <= 20:
        width = max(len(c) for c in m["per_class"])
        _say(f"{'class':<{width}}  precision  recall  support")
        for c, v in m["per_class"].items():
            _say(f"{c:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['support']:7d}")


def _print_bench(ms, report) -> None:
    from rich.table import Table

    console = out_console if out_console.is_terminal else Console(width=160)
    table = Table(title=f"{ms[0].device_name} ({ms[0].device}, {ms[0].threads} threads)", title_justify="left")
    for col in ("config", "params", "GMACs", "batch", "img/s", "x", "p50 ms", "p99 ms", "peak MiB", "J/img", "top-1"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for m, r in zip(ms, report["ratios_vs_first"]):
        acc = None if m.accuracy is None else 100 * m.accuracy
        table.add_row(m.label, f"{m.params / 1e6:.2f}M", f"{m.gmacs:.3f}", str(m.batch_size), f"{m.img_per_s:.1f}",
                      f"{r['speedup']:.2f}", f"{m.latency_ms['p50']:.1f}", f"{m.latency_ms['p99']:.1f}",
                      _fmt(m.peak_memory_mb, ".0f"), _fmt(m.joules_per_img, ".4f"), _fmt(acc, ".2f"))
    console.print(table)
    for note in sorted({m.energy.reason for m in ms if m.energy.reason}):
        console.print(f"J/img unavailable: {note}", highlight=False)
    console.print(f"peak memory: {ms[0].memory_kind}; x = img/s vs the first row; img/s = median of "
                  f"{len(ms[0].img_per_s_runs)} interleaved repeats"
                  + (f"; top-1 on {ms[0].accuracy_on}" if ms[0].accuracy_on else ""), highlight=False)


# --------------------------------------------------------------------------- main job
@command(app, ("run",), {"config": JobConfig},
         (_out("Run folder (default runs/run-<time>)."), _resume("main-job run folder"), _json("Print summary.json."),
          PROGRESS))
def run(config: JobConfig, out, resume, as_json, progress):
    """The main job: data -> DeiT-B/16 baseline -> supernet + search -> subnet x ToMe x precision
    -> the fastest configuration that meets the requirement, the ablation, the report."""
    from .optimize import resume_job, run_job
    from .optimize.job import join_processes, recorded_device
    from .report import terminal_lines
    from .runtime import is_main

    join_processes(config.device if resume is None else recorded_device(resume))
    summary = resume_job(resume, progress) if resume is not None else run_job(config, out, progress)
    if not is_main():  # under torchrun, rank 0 reports
        return
    if as_json:
        return _print_json(summary.to_dict())
    _say("\n".join(terminal_lines(summary)))


# --------------------------------------------------------------------------- training
def _print_training(result, as_json: bool, summary: dict[str, Any]) -> None:
    if as_json:
        return _print_json(summary)
    _say(f"run folder: {result.run.root} ({result.seconds:.0f} s)")
    if result.test:
        _say(f"test split, best epoch {result.best_epoch + 1}:")
        _print_metrics(result.test)


@command(app, ("train",), {"config": TrainConfig},
         (_out("Run folder (default runs/train-<time>)."), _resume("run folder"), _json(), PROGRESS))
def train(config: TrainConfig, out, resume, as_json, progress):
    """Fine-tune a timm ViT (DeiT recipe) into a run folder; --resume continues one."""
    from .runtime import init_distributed, world
    from .train import resume as resume_run
    from .train import train as train_run

    init_distributed(config.device)
    result = resume_run(resume, progress) if resume is not None else train_run(config, out, progress)
    if world()[0] == 0:  # under torchrun, rank 0 reports
        _print_training(result, as_json, {"run": str(result.run.root), "best_epoch": result.best_epoch,
                                          "best_val": result.best_val, "test": result.test,
                                          "seconds": round(result.seconds, 1)})


@command(nas_app, ("nas", "train"), {"config": SupernetConfig},
         (_out("Run folder (default runs/supernet-<time>)."), _resume("supernet run"), _json(), PROGRESS))
def nas_train(config: SupernetConfig, out, resume, as_json, progress):
    """Train an AutoFormer supernet (one process, or `torchrun --nproc_per_node N -m vitfab nas train`)."""
    from .nas import resume_supernet, train_supernet
    from .runtime import init_distributed, world

    init_distributed(config.device)
    result = resume_supernet(resume, progress) if resume is not None else train_supernet(config, out, progress)
    if world()[0] == 0:
        _print_training(result, as_json, {"run": str(result.run.root), "best_epoch": result.best_epoch,
                                          "best_val_largest": result.best_val, "seconds": round(result.seconds, 1),
                                          "img_per_s": [round(r.get("img_per_s", 0.0), 1) for r in result.history]})


# --------------------------------------------------------------------------- evaluation and prediction
@command(app, ("eval",), {"config": EvalConfig}, (_json("Print all metrics as JSON."), PROGRESS))
def eval_(config: EvalConfig, as_json, progress):
    """Top-1/top-5, macro-F1, per-class precision/recall, confusion PNG, escape and overkill rates."""
    m, where = config.evaluate(progress)
    if as_json:
        return _print_json(m)
    _print_metrics(m)
    _say(f"results in {where}")


@command(app, ("predict",), {"config": PredictConfig}, (PROGRESS,))
def predict(config: PredictConfig, progress):
    """Classify images with a trained checkpoint or an exported model; write a CSV."""
    rows, skipped = config.run(progress)
    flagged = sum(r.get("decision") == "flag" for r in rows)
    decided = any(r.get("decision") for r in rows)
    _say(f"{len(rows)} predictions -> {config.out}" + (f", {flagged} flagged" if decided else "")
         + (f" ({len(skipped)} skipped)" if skipped else ""))


@command(app, ("calibrate",), {"config": CalibrateConfig}, (_json("Print the before / after record."), PROGRESS))
def calibrate(config: CalibrateConfig, as_json, progress):
    """Re-fit a model's operating point (temperature, reject threshold) on new labelled line data."""
    from .export.calibrate import record_lines

    record = config.run(progress)
    if as_json:
        return _print_json(record)
    _say("\n".join(record_lines(record, config.model)))


@command(app, ("export",), {"config": ExportConfig}, (_json("Print deploy.json."),))
def export_(config: ExportConfig, as_json):
    """Export a model (ToMe inside) as safetensors + TorchScript + ONNX, checked in ONNX Runtime."""
    info = config.run()
    if as_json:
        return _print_json(info)
    _say(f"deploy folder: {config.out}  ({', '.join(info['files'].values())})")
    for k, v in info["parity_max_abs_diff"].items():
        _say(f"{k}: max |logit difference| vs PyTorch fp32 = {v:.2e}")


# --------------------------------------------------------------------------- measurement
@command(app, ("bench",), {"request": BenchRequest, "options": BenchOptions},
         (_out("Also write the JSON result to this file."), _json("Print JSON instead of the table."), PROGRESS))
def bench(request: BenchRequest, options: BenchOptions, out, as_json, progress):
    """Params, MACs, img/s, batch-1 latency, peak memory, J/img; several configurations interleaved."""
    from .files import write_json_atomic
    from .measure.bench import bench_report, benchmark

    ms = benchmark(request.configs(), options, progress)
    report = bench_report(ms)
    if out is not None:
        write_json_atomic(out, report)
    return _print_json(report) if as_json else _print_bench(ms, report)


@command(app, ("precision",), {"config": PrecisionRequest}, (_json(), PROGRESS))
def precision_(config: PrecisionRequest, as_json, progress):
    """Resolve --precision auto: measure every mode, keep the fastest within tolerance of fp32."""
    from .precision import accuracy_table

    choice, desc = config.run(progress)
    if as_json:
        return _print_json({**choice.to_dict(), "data": desc})
    _say(f"top-1 on {desc}, {choice.device}:")
    for row in accuracy_table(choice):
        acc = _fmt(None if row["accuracy"] is None else 100 * row["accuracy"], "6.2f", "     -")
        _say(f"  {row['precision']:<5} top-1 {acc}%  change {_fmt(row['delta_points'], '+6.2f', '     -')}"
             f"  img/s {_fmt(row['img_per_s'], '8.1f', '       -')}  x {_fmt(row['speedup'], '5.2f', '    -')}"
             f"  {row['reason']}")
    _say(f"chosen: {choice.precision}")


@command(app, ("sweep",), {"config": SweepConfig},
         (_out("Folder for results (default runs/sweep-<model>); a killed sweep resumes from it."),
          _json("Print the rows as JSON."), PROGRESS))
def sweep(config: SweepConfig, out, as_json, progress):
    """Accuracy vs throughput of ToMe r x precision off the shelf (the ToMe paper's analysis)."""
    from .measure.sweep import run_sweep

    rows = run_sweep(config, out, progress)
    if as_json:
        return _print_json(rows)
    _say(f"{'ToMe r':>10} {'precision':>9} {'top-1 %':>8} {'GMACs':>7} {'img/s':>8} {'x':>6} {'p50 ms':>7}")
    for r in rows:
        _say(f"{r['tome_r']:>10} {r['precision']:>9} {100 * r['top1']:8.2f} {r['gmacs']:7.3f} "
             f"{r['img_per_s']:8.1f} {r['speedup']:6.2f} {r['latency_ms_p50']:7.2f}")


# --------------------------------------------------------------------------- architecture search
@command(nas_app, ("nas", "search"), {"request": SearchRequest, "config": SearchConfig}, (_json(), PROGRESS))
def nas_search(request: SearchRequest, config: SearchConfig, as_json, progress):
    """Evolutionary search (AutoFormer) under limits; candidates scored on the run's validation split."""
    result = request.run(config, progress)
    b = result.best
    if as_json:
        return _print_json({"best": b.to_dict(), "evaluated": result.evaluated, "seconds": round(result.seconds, 1),
                            "pareto": [c.to_dict() for c in result.pareto], "out": str(result.out)})
    _say(f"best of {result.evaluated} candidates ({request.limits().describe()}): {b.arch.short()}\n"
         f"  val top-1 {100 * b.accuracy:.2f}% (supernet weights), {b.params / 1e6:.2f}M params, {b.gmacs:.3f} GMACs\n"
         f"  {len(result.pareto)} on the Pareto front; files in {result.out} (best.yaml, candidates.yaml, pareto.csv)")


@command(nas_app, ("nas", "extract"), {"request": ExtractRequest})
def nas_extract(request: ExtractRequest):
    """Slice a subnet out of a supernet as a standalone timm VisionTransformer."""
    from .measure import count_macs, count_params
    from .runtimes import load_model

    folder = request.run()
    model = load_model(folder)
    _say(f"{model.vitfab_meta.name}: {count_params(model) / 1e6:.2f}M params, {count_macs(model) / 1e9:.3f} GMACs "
         f"-> {folder}")


# --------------------------------------------------------------------------- token merging
@command(tome_app, ("tome", "visualize"), {}, (
    Extra("checkpoint", Path, typer.Option(..., help="A vitfab checkpoint or run folder.")),
    Extra("image", Path, typer.Option(..., help="The image to show the merges on.")),
    Extra("r", str, typer.Option("8", "--r", help="ToMe schedule: R, R:INFLECTION, R1/R2/..., keep=F or macs=F.")),
    Extra("out", Path, typer.Option(Path("tome.png"), help="PNG: the image | its merged patch groups."))))
def tome_visualize(checkpoint, image, r, out):
    """Colour each group of merged patches (ToMe source tracing) over the image."""
    from .runtimes import load_model
    from .tome.visualize import visualize_merges

    if not image.is_file():
        raise VitfabError(f"image not found: {image}")
    s = visualize_merges(load_model(checkpoint, "cpu"), image, r, out)
    _say(f"{s['patches']} patches -> {s['groups']} tokens; predicted {s['predicted']} "
         f"({100 * s['confidence']:.1f}%) -> {out}")


# --------------------------------------------------------------------------- data
@command(data_app, ("data", "synth"), {"config": SynthConfig},
         (_out("New folder for the ImageFolder dataset.", required=True), PROGRESS))
def data_synth(config: SynthConfig, out, progress):
    """Simulated 3D X-ray images of BGA solder joints: 7 classes, 3 slices as channels."""
    from .data.synth import synthesize
    from .progress import task

    n = config.n_per_class * len(config.classes)
    with task("synthesising", total=n, enabled=progress) as advance:
        meta = synthesize(out, config, on_progress=advance)
    _say(f"{n} images ({len(config.classes)} classes, {config.img_size} px) in {meta['seconds']:.1f} s -> {out}")


@command(data_app, ("data", "info"), {"scan": ScanOptions}, (
    Extra("data", Path, typer.Argument(..., help="ImageFolder dataset.")), _json(), PROGRESS))
def data_info(scan: ScanOptions, data, as_json, progress):
    """Check every image; print class counts and the imbalance ratio."""
    from .data.images import scan_checked

    index = scan_checked(data, scan.skip_bad_images, progress, max_pixels=scan.max_image_pixels)
    counts = index.class_counts()
    ratio = max(counts.values()) / max(min(counts.values()), 1)
    if as_json:
        return _print_json({"classes": counts, "images": len(index.samples), "imbalance_ratio": ratio,
                            "skipped": index.skipped})
    width = max(len(c) for c in counts)
    for c, n in counts.items():
        _say(f"{c:<{width}}  {n:6d}")
    _say(f"{len(index.samples)} images, {len(counts)} classes, imbalance {ratio:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Entry point behind ``vitfab.boundary``: user and environment errors are one line on stderr and
    exit 2, never a traceback (``--debug`` shows it); usage errors are typer's own, also 2."""
    from .boundary import guarded

    return guarded(lambda args: app(args=args, prog_name="vitfab"), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
