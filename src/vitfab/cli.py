"""``vitfab`` command line: a thin typer layer over the Python API (no logic of its own)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
import yaml
from rich.console import Console

from .errors import VitfabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Vision Transformers cheap enough for the inspection line.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthesise, inspect.")
app.add_typer(data_app, name="data")
nas_app = typer.Typer(no_args_is_help=True, help="Architecture search (AutoFormer): train a supernet, search, extract.")
app.add_typer(nas_app, name="nas")
tome_app = typer.Typer(no_args_is_help=True, help="Token merging (ToMe): visualise merges.")
app.add_typer(tome_app, name="tome")

out_console = Console()  # results on stdout; progress and notes go to stderr


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _parse_model_args(items: List[str]) -> dict[str, Any]:
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VitfabError(f"--model-arg expects KEY=VALUE, got '{item}'")
        args[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return args


def _new_or_resumed(data, resume, new_run, resume_run):
    """A training command's run: resumed with --resume, else new (needs --data). None on the
    torchrun processes other than rank 0, which report nothing."""
    from .runtime import world

    if resume is not None:
        result = resume_run()
    elif data is None:
        raise VitfabError("--data DIR is required (or --resume RUN_DIR)")
    else:
        result = new_run()
    return result if world()[0] == 0 else None


def _print_metrics(m: dict[str, Any]) -> None:
    from .evaluate import format_metrics

    out_console.print(format_metrics(m), highlight=False)
    if len(m.get("per_class", {})) <= 20:
        width = max(len(c) for c in m["per_class"])
        out_console.print(f"{'class':<{width}}  precision  recall  support", highlight=False)
        for c, v in m["per_class"].items():
            out_console.print(f"{c:<{width}}  {v['precision']:9.3f}  {v['recall']:6.3f}  {v['support']:7d}",
                              highlight=False)


# --------------------------------------------------------------------------- main job
@app.command()
def run(
    data: Optional[Path] = typer.Option(None, help="ImageFolder dataset; default: synthesise the X-ray set."),
    min_accuracy: Optional[float] = typer.Option(None, help="Required validation top-1 (0-1, or percent)."),
    max_drop: float = typer.Option(1.0, help="Else: at most this many points below the DeiT-B/16 baseline."),
    objective: str = typer.Option("throughput", help="What 'fastest' means: throughput, latency or energy."),
    device: str = typer.Option("auto", help="auto, cpu or cuda: where models train and are measured."),
    scale: str = typer.Option("small", help="small (64 px, minutes on a CPU) or full (224 px, the paper's setting)."),
    budget_minutes: Optional[float] = typer.Option(None, help="Wall-clock budget; epochs and search size are "
                                                              "scaled to fit [default: 10 at small, none at full; "
                                                              "0 = none]."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/run-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this interrupted run folder."),
    baseline_weights: Optional[Path] = typer.Option(None, help="Local DeiT-B/16 weights (instead of the hub)."),
    space: str = typer.Option("tiny", help="AutoFormer search space: tiny, small, base or a YAML file."),
    min_reduction: float = typer.Option(10.0, help="Search limit: params and GMACs at most the baseline's / this."),
    tome_grid: str = typer.Option("none,macs=0.75,macs=0.5,macs=0.35", help="ToMe schedules to try (comma list)."),
    precisions: Optional[str] = typer.Option(None, help="Precision modes to try (default: those worth it here)."),
    distill: str = typer.Option("none", help="Also fine-tune the best subnet distilled from the baseline: soft, "
                                              "hard or none; kept only if it helps on validation."),
    top_k: Optional[int] = typer.Option(None, help="Subnets extracted and fine-tuned [default: 2 small, 3 full]."),
    img_size: Optional[int] = typer.Option(None, help="Input size [default: 64 small, 224 full]."),
    patch_size: Optional[int] = typer.Option(None, help="Patch size [default: 8 small, 16 full]."),
    baseline_epochs: Optional[int] = typer.Option(None, help="Nominal baseline epochs (before the budget)."),
    supernet_epochs: Optional[int] = typer.Option(None, help="Nominal supernet epochs (before the budget)."),
    finetune_epochs: Optional[int] = typer.Option(None, help="Nominal subnet fine-tune epochs (before the budget)."),
    final_epochs: Optional[int] = typer.Option(None, help="Nominal final fine-tune epochs (before the budget)."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size [default: 16 small, 64 full]."),
    n_per_class: int = typer.Option(200, help="Synthetic images per class (no --data)."),
    difficulty: float = typer.Option(0.5, help="Synthetic defect subtlety, 0..1 (no --data)."),
    seed: int = typer.Option(0),
    good_class: Optional[str] = typer.Option(None, help="Class meaning 'no defect' (default: good/normal/ok)."),
    max_per_class: Optional[int] = typer.Option(None, help="Use at most N images per class (seeded)."),
    skip_bad_images: bool = typer.Option(False, help="Skip unreadable images with a warning."),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json to stdout."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """The main job: data -> DeiT-B/16 baseline -> supernet + search -> subnet x ToMe x precision
    -> the fastest configuration that meets the requirement, the ablation, the report."""
    from .optimize import JobConfig, resume_job, run_job

    if resume is not None:
        summary = resume_job(resume, progress)
    else:
        cfg = JobConfig(
            data=str(data) if data else None, min_accuracy=min_accuracy, max_drop=max_drop, objective=objective,
            device=device, scale=scale, budget_minutes=budget_minutes,
            baseline_weights=str(baseline_weights) if baseline_weights else None, space=space,
            min_reduction=min_reduction, tome_grid=tome_grid, precisions=precisions, distill=distill, top_k=top_k,
            img_size=img_size, patch_size=patch_size, baseline_epochs=baseline_epochs,
            supernet_epochs=supernet_epochs, finetune_epochs=finetune_epochs, final_epochs=final_epochs,
            batch_size=batch_size, n_per_class=n_per_class, difficulty=difficulty, seed=seed, good_class=good_class,
            max_per_class=max_per_class, skip_bad_images=skip_bad_images,
        )
        summary = run_job(cfg, out, progress)
    if as_json:
        _print_json(summary)
        return
    from .report.render import ablation_table

    ch = summary["chosen"]
    out_console.print(f"\nrun folder: {summary['run']}", highlight=False)
    out_console.print(f"requirement: {summary['requirement']} -> {'met' if summary['requirement_met'] else 'NOT met'}",
                      highlight=False)
    out_console.print(f"chosen: {ch['arch']} | ToMe {ch['tome'] or 'none'} | {ch['precision']}  "
                      f"(test top-1 {100 * ch['test']['top1']:.2f} %)", highlight=False, soft_wrap=True)
    out_console.print("\n".join(ablation_table(summary["ablation"])), highlight=False, soft_wrap=True)
    at = summary.get("at_224")
    if at:
        out_console.print(f"at 224 px: {at['speedup']:.1f}x DeiT-B/16 fp32 throughput, {at['params_reduction']:.1f}x "
                          f"fewer params, {at['macs_reduction']:.1f}x fewer GMACs", highlight=False)
    out_console.print(f"report: {Path(summary['run']) / 'report' / 'report.html'}", highlight=False)
    out_console.print(f"wall time: {summary['wall_seconds_this_call']:.0f} s", highlight=False)


# --------------------------------------------------------------------------- training
@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="ImageFolder dataset (<class>/<image>)."),
    model: str = typer.Option("deit_tiny_patch16_224", help="timm ViT name; the reference is deit_base_patch16_224."),
    img_size: Optional[int] = typer.Option(None, help="Override the input size (position embeddings resized)."),
    patch_size: Optional[int] = typer.Option(None, help="Override the patch size."),
    model_arg: List[str] = typer.Option([], help="Extra timm argument KEY=VALUE (e.g. depth=6); repeatable."),
    pretrained: bool = typer.Option(False, help="Start from timm's hub weights (needs the network)."),
    weights: Optional[Path] = typer.Option(None, help="Start from a local .safetensors/.pth/.pt file."),
    tome_r: Optional[str] = typer.Option(None, help="Train with token merging on: R, R:INFLECTION, R1/R2/..., "
                                                    "keep=F or macs=F (recorded in the checkpoints)."),
    arch: Optional[Path] = typer.Option(None, help="Train an AutoFormer subnet (a RETRAIN YAML) as a standalone "
                                                   "model (vitfab_subnet); e.g. the best.yaml of `vitfab nas search`."),
    init_checkpoint: Optional[Path] = typer.Option(None, help="Fine-tune a vitfab checkpoint (e.g. an extracted "
                                                              "subnet): its architecture and weights; head replaced "
                                                              "for other classes, position embedding resized."),
    augment: bool = typer.Option(True, help="Random crops/flips/rotations in training (off: deterministic)."),
    teacher: Optional[Path] = typer.Option(None, help="Distil from this trained vitfab checkpoint (same classes)."),
    distill: str = typer.Option("soft", help="With --teacher: soft (KL to the teacher) or hard (its argmax as label)."),
    distill_alpha: float = typer.Option(0.5, help="With --teacher --distill soft: weight of the KL term."),
    distill_tau: float = typer.Option(1.0, help="With --teacher --distill soft: temperature."),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(64),
    lr: Optional[float] = typer.Option(None, help="Peak LR (default 5e-4 from scratch, 1e-4 from weights)."),
    weight_decay: float = typer.Option(0.05),
    warmup_epochs: float = typer.Option(2.0),
    min_lr: float = typer.Option(1e-6),
    label_smoothing: float = typer.Option(0.1),
    mixup: float = typer.Option(0.0, help="Mixup alpha (DeiT: 0.8); 0 = off."),
    cutmix: float = typer.Option(0.0, help="CutMix alpha (DeiT: 1.0); 0 = off."),
    drop_path: float = typer.Option(0.1),
    clip_grad: Optional[float] = typer.Option(None),
    amp: str = typer.Option("auto", help="auto (bf16 on CPUs with native bf16, fp16 on CUDA), off, bf16, fp16."),
    accum_steps: int = typer.Option(1, help="Gradient accumulation steps."),
    seed: int = typer.Option(0),
    val_fraction: float = typer.Option(0.15),
    test_fraction: float = typer.Option(0.15),
    max_per_class: Optional[int] = typer.Option(None, help="Use at most N images per class (seeded)."),
    skip_bad_images: bool = typer.Option(False, help="Skip unreadable images with a warning."),
    good_class: Optional[str] = typer.Option(None, help="Class meaning 'no defect' (default: good/normal/ok)."),
    device: str = typer.Option("auto"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: 0 on <=2 cores)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/train-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this run folder after an interruption."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Fine-tune a timm ViT (DeiT recipe) into a run folder; --resume continues one."""
    from .runtime import init_distributed
    from .train import TrainConfig
    from .train import resume as resume_run
    from .train import train as train_run

    init_distributed(device)
    extra_args: dict[str, Any] = {}  # architecture arguments taken from a file, not typed by hand
    if init_checkpoint is not None:
        from .train.config import checkpoint_model_args

        if arch is not None or weights is not None or pretrained:
            raise VitfabError("--init-checkpoint brings its own architecture and weights: drop --arch/--weights/"
                              "--pretrained")
        inherited = checkpoint_model_args(init_checkpoint)
        model, weights, extra_args = inherited["model"], inherited["weights"], inherited["model_args"]
        patch_size = patch_size or inherited["patch_size"]
        img_size = img_size or inherited["img_size"]
    if arch is not None:
        from .models.arch import load_arch
        from .models.subnet import subnet_kwargs

        model = "vitfab_subnet"
        extra_args = subnet_kwargs(load_arch(arch))
    def new_run():
        cfg = TrainConfig(
            data=str(data), model=model, img_size=img_size, patch_size=patch_size,
            model_args=extra_args | _parse_model_args(model_arg), pretrained=pretrained,
            weights=str(weights) if weights else None, tome=tome_r, augment=augment,
            teacher=str(teacher) if teacher else None, distill=distill, distill_alpha=distill_alpha,
            distill_tau=distill_tau, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
            label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, drop_path=drop_path,
            clip_grad=clip_grad, amp=amp, accum_steps=accum_steps, seed=seed, val_fraction=val_fraction,
            test_fraction=test_fraction, max_per_class=max_per_class, skip_bad_images=skip_bad_images,
            good_class=good_class, device=device, workers=workers,
        )
        return train_run(cfg, out, progress)

    result = _new_or_resumed(data, resume, new_run, lambda: resume_run(resume, progress))
    if result is None:
        return
    summary = {"run": str(result.run.root), "best_epoch": result.best_epoch, "best_val": result.best_val,
               "test": result.test, "seconds": round(result.seconds, 1)}
    if as_json:
        _print_json(summary)
        return
    out_console.print(f"run folder: {result.run.root}", highlight=False)
    if result.test:
        out_console.print(f"test split, best epoch {result.best_epoch + 1}:", highlight=False)
        _print_metrics(result.test)


# --------------------------------------------------------------------------- evaluation
@app.command("eval")
def eval_(
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder: its best checkpoint on its own split."),
    checkpoint: Optional[Path] = typer.Option(None, help="A vitfab checkpoint (folder or .safetensors)."),
    model: Optional[str] = typer.Option(None, help="A timm model name (with --pretrained or --weights)."),
    pretrained: bool = typer.Option(False, help="With --model: timm's hub weights."),
    weights: Optional[Path] = typer.Option(None, help="With --model: a local weights file."),
    img_size: Optional[int] = typer.Option(None, help="With --model: input size override."),
    patch_size: Optional[int] = typer.Option(None, help="With --model: patch size override."),
    model_arg: List[str] = typer.Option([], help="With --model: extra timm argument KEY=VALUE; repeatable."),
    data: Optional[Path] = typer.Option(None, help="Labelled folder (for --run: where the run's data now lives)."),
    split: str = typer.Option("test", help="With --run: train, val, test or all."),
    good_class: Optional[str] = typer.Option(None, help="Class meaning 'no defect' (default: good/normal/ok)."),
    out: Optional[Path] = typer.Option(None, help="Folder for metrics.json and confusion.png."),
    batch_size: int = typer.Option(64),
    skip_bad_images: bool = typer.Option(False),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print all metrics as JSON."),
    progress: bool = typer.Option(True),
):
    """Top-1/top-5, macro-F1, per-class precision/recall, confusion PNG, escape and overkill rates."""
    from .evaluate.api import evaluate_folder, evaluate_run
    from .models import create_model, load_model
    from .runtime import resolve_device

    dev = resolve_device(device)
    chosen = [x for x in (run, checkpoint, model) if x is not None]
    if len(chosen) != 1:
        raise VitfabError("give exactly one of --run RUN_DIR, --checkpoint PATH, --model NAME")
    if run is not None:
        m, where = evaluate_run(run, split, data, dev, good_class, batch_size, progress)
    else:
        if data is None:
            raise VitfabError("--data DIR is required with --checkpoint or --model")
        if checkpoint is not None:
            net = load_model(checkpoint, dev)
        else:
            if not (pretrained or weights):
                raise VitfabError("--model needs --pretrained or --weights PATH (an untrained model is noise)")
            net = create_model(model, img_size=img_size, patch_size=patch_size, pretrained=pretrained,
                               weights=weights, **_parse_model_args(model_arg)).to(dev).eval()
        m, where = evaluate_folder(net, data, out, dev, good_class, batch_size, skip_bad_images, progress)
    if as_json:
        _print_json(m)
        return
    _print_metrics(m)
    out_console.print(f"results in {where}", highlight=False)


# --------------------------------------------------------------------------- prediction
@app.command()
def predict(
    checkpoint: Optional[Path] = typer.Option(None, help="A vitfab checkpoint or run folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="A deploy folder (vitfab export) or .onnx file."),
    input: List[Path] = typer.Option(..., "--input", help="Image file or folder; repeatable."),
    out: Path = typer.Option(Path("preds.csv"), help="CSV: file, class, confidence, topk."),
    runtime: str = typer.Option("torch", help="torch, or onnxruntime (a deploy folder or .onnx file)."),
    topk: int = typer.Option(3, help="How many classes to list per image."),
    batch_size: int = typer.Option(64),
    skip_bad_images: bool = typer.Option(False),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("recorded", help="recorded (the mode saved with the model, e.g. by vitfab run; "
                                                    "else fp32; fp32 in onnxruntime), fp32, fp16, bf16 or int8."),
    progress: bool = typer.Option(True),
):
    """Classify images with a trained checkpoint or an exported model; write a CSV."""
    from .export import load_deployed
    from .predict import expand_inputs, predict_images, write_predictions_csv
    from .runtime import resolve_device

    if (model is None) == (checkpoint is None):
        raise VitfabError("give exactly one of --checkpoint PATH or --model DEPLOY_DIR_OR_ONNX")
    if topk < 1:
        raise VitfabError(f"--topk must be at least 1, got {topk}")
    dev = resolve_device(device)
    if precision != "recorded":
        from .precision import parse_precision

        precision = parse_precision(precision, allow_auto=False).value
    paths = expand_inputs(input)
    path = model if model is not None else checkpoint
    if not path.exists():
        raise VitfabError(f"{'model' if model is not None else 'checkpoint'} not found: {path}")
    net = load_deployed(path, runtime, dev, precision)
    rows, skipped = predict_images(net, paths, dev, batch_size, topk, skip_bad_images, progress=progress)
    write_predictions_csv(rows, out)
    out_console.print(f"{len(rows)} predictions -> {out}" + (f" ({len(skipped)} skipped)" if skipped else ""),
                      highlight=False)


@app.command("export")
def export_(
    model: Path = typer.Option(..., "--model", help="A vitfab checkpoint, run folder or main-job run's chosen/."),
    out: Path = typer.Option(Path("deploy"), help="The deploy folder to write (replaced atomically)."),
    format: str = typer.Option("safetensors,torchscript,onnx", "--format", help="Comma list of safetensors, "
                                                                                "torchscript, onnx."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
    tolerance: float = typer.Option(1e-3, help="Max |logit difference| against PyTorch fp32 each format must meet."),
    as_json: bool = typer.Option(False, "--json", help="Print deploy.json."),
):
    """Export a model (ToMe inside) as safetensors + TorchScript + ONNX, checked in ONNX Runtime."""
    from .export import export_deploy
    from .export.deploy import parse_formats

    formats = parse_formats(format)
    if not model.exists():
        raise VitfabError(f"not found: {model}")
    if model.is_dir() and (model / "chosen").is_dir() and (model / "state.json").is_file():
        model = model / "chosen"  # a main-job run folder: its chosen model
    info = export_deploy(model, out, formats, opset, tolerance)
    if as_json:
        _print_json(info)
        return
    out_console.print(f"deploy folder: {out}  ({', '.join(info['files'].values())})", highlight=False)
    for k, v in info["parity_max_abs_diff"].items():
        out_console.print(f"{k}: max |logit difference| vs PyTorch fp32 = {v:.2e}", highlight=False)


@app.command()
def sweep(
    data: Path = typer.Option(..., help="Labelled folder: ImageNet-1k val (synset folders) or the model's classes."),
    model: Optional[str] = typer.Option(None, help="timm model name, with --pretrained or --weights."),
    pretrained: bool = typer.Option(False, help="With --model: timm's hub weights."),
    weights: Optional[Path] = typer.Option(None, help="With --model: a local weights file."),
    checkpoint: Optional[Path] = typer.Option(None, help="Or a vitfab checkpoint (e.g. an extracted AutoFormer subnet)."),
    img_size: Optional[int] = typer.Option(None, help="With --model: input size override."),
    patch_size: Optional[int] = typer.Option(None, help="With --model: patch size override."),
    tome_r: str = typer.Option("0,4,8,12,16", help="ToMe schedules, comma list (R, R:INFLECTION, keep=F, macs=F)."),
    precision: str = typer.Option("fp32,bf16", help="Precision modes, comma list."),
    max_images: Optional[int] = typer.Option(None, help="A seeded subset of the folder, for a quick look."),
    batch_size: int = typer.Option(64, help="Batch size of the accuracy passes."),
    device: str = typer.Option("auto"),
    repeats: int = typer.Option(5, help="Throughput repeats per configuration (median reported)."),
    min_repeat_seconds: float = typer.Option(1.0, help="Each throughput repeat lasts at least this long."),
    out: Optional[Path] = typer.Option(None, help="Folder for results (default runs/sweep-<model>); a killed sweep "
                                                  "resumes from it."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    progress: bool = typer.Option(True),
):
    """Accuracy vs throughput of ToMe r x precision off the shelf (the ToMe paper's analysis)."""
    from .measure.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(data=str(data), model=model, pretrained=pretrained, weights=str(weights) if weights else None,
                      checkpoint=str(checkpoint) if checkpoint else None, img_size=img_size, patch_size=patch_size,
                      tome_r=_split_list(tome_r, "--tome-r"), precisions=_split_list(precision, "--precision"),
                      max_images=max_images, batch_size=batch_size, device=device, repeats=repeats,
                      min_repeat_seconds=min_repeat_seconds)
    cfg.validate()
    name = model or Path(str(checkpoint)).name
    rows = run_sweep(cfg, out or Path("runs") / f"sweep-{name}", progress)
    if as_json:
        _print_json(rows)
        return
    out_console.print(f"{'ToMe r':>10} {'precision':>9} {'top-1 %':>8} {'GMACs':>7} {'img/s':>8} {'x':>6} {'p50 ms':>7}",
                      highlight=False)
    for r in rows:
        out_console.print(f"{r['tome_r']:>10} {r['precision']:>9} {100 * r['top1']:8.2f} {r['gmacs']:7.3f} "
                          f"{r['img_per_s']:8.1f} {r['speedup']:6.2f} {r['latency_ms_p50']:7.2f}", highlight=False)


# --------------------------------------------------------------------------- measurement
def _split_list(value: str, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise VitfabError(f"{what} is empty")
    return items


def _fmt(v: float | None, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, help="timm model name (random weights; speed does not depend on them)."),
    checkpoint: Optional[Path] = typer.Option(None, help="A vitfab checkpoint or run folder."),
    precision: str = typer.Option("fp32", help="fp32, fp16, bf16, int8 or auto; a comma list compares several."),
    tome_r: Optional[str] = typer.Option(
        None, help="ToMe schedule: R, R:INFLECTION (16:-1 = decreasing), R1/R2/... per layer, keep=F, macs=F, or "
                   "none (stock model), recorded (as saved with the checkpoint); a comma list compares several "
                   "[default: none]."),
    runtime: Optional[str] = typer.Option(None, help="torch or onnxruntime (a deploy folder or .onnx file) "
                                                     "[default: onnxruntime for .onnx files, else torch]."),
    batch_size: Optional[int] = typer.Option(None, help="Throughput batch [default: 16 on CPU, 256 on CUDA]."),
    img_size: Optional[int] = typer.Option(None, help="With --model: input size override."),
    vs: List[str] = typer.Option([], help="Another configuration, KEY=VALUE[,KEY=VALUE] changed from the first "
                                          "(keys: model, checkpoint, precision, tome_r, batch_size, img_size, method, "
                                          "label, runtime); repeatable."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    data: Optional[Path] = typer.Option(None, help="Labelled folder: also measure top-1 of each configuration."),
    split: str = typer.Option("val", help="With a run folder as --checkpoint: the split to measure top-1 on."),
    tolerance: float = typer.Option(0.01, help="--precision auto: allowed top-1 drop vs fp32 (0.01 = one point)."),
    repeats: int = typer.Option(5, help="Throughput repeats per configuration (median reported)."),
    min_repeat_seconds: float = typer.Option(1.0, help="Each throughput repeat lasts at least this long."),
    latency_runs: int = typer.Option(50, help="Batch-1 calls per configuration for the latency percentiles."),
    energy: bool = typer.Option(True, help="Measure J/img with NVML (GPU) or RAPL (CPU) where readable."),
    energy_seconds: float = typer.Option(3.0, help="Energy window per configuration."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's choice]."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON result to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
    progress: bool = typer.Option(True),
):
    """Params, MACs, img/s, batch-1 latency, peak memory, J/img; several configurations interleaved."""
    from .files import write_json_atomic
    from .measure.bench import BenchConfig, bench_report, benchmark, parse_tome_spec
    from .runtime import resolve_device

    if (model is None) == (checkpoint is None):
        raise VitfabError("give exactly one of --model NAME or --checkpoint PATH")
    schedules = [parse_tome_spec(v) for v in _split_list(tome_r, "--tome-r")] if tome_r is not None else [None]
    base = BenchConfig(model=model, checkpoint=str(checkpoint) if checkpoint else None, batch_size=batch_size,
                       img_size=img_size, runtime=runtime)
    configs = [dataclasses.replace(base, precision=p, tome_r=r)
               for p in _split_list(precision, "--precision") for r in schedules]
    configs += [configs[0].with_overrides(spec) for spec in vs]
    for c in configs:
        c.validate()
    dev = resolve_device(device)
    ms = benchmark(configs, dev, repeats=repeats, min_repeat_seconds=min_repeat_seconds, latency_runs=latency_runs,
                   energy=energy, energy_seconds=energy_seconds, threads=threads, data=data, split=split, tolerance=tolerance,
                   progress=progress)
    report = bench_report(ms)
    if out is not None:
        write_json_atomic(out, report)
    if as_json:
        _print_json(report)
        return
    from rich.table import Table

    console = out_console if out_console.is_terminal else Console(width=160)
    table = Table(title=f"{ms[0].device_name} ({ms[0].device}, {ms[0].threads} threads)", title_justify="left")
    for col in ("config", "params", "GMACs", "batch", "img/s", "x", "p50 ms", "p99 ms", "peak MiB", "J/img",
                "top-1"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for m, r in zip(ms, report["ratios_vs_first"]):
        acc = None if m.accuracy is None else 100 * m.accuracy
        table.add_row(m.label, f"{m.params / 1e6:.2f}M", f"{m.gmacs:.3f}", str(m.batch_size), f"{m.img_per_s:.1f}",
                      f"{r['speedup']:.2f}", f"{m.latency_ms['p50']:.1f}", f"{m.latency_ms['p99']:.1f}",
                      _fmt(m.peak_memory_mb, ".0f"), _fmt(m.joules_per_img, ".4f"), _fmt(acc, ".2f"))
    console.print(table)
    notes = {m.energy.reason for m in ms if m.energy.reason}
    for note in sorted(notes):
        console.print(f"J/img unavailable: {note}", highlight=False)
    console.print(f"peak memory: {ms[0].memory_kind}; x = img/s vs the first row; "
                      f"img/s = median of {len(ms[0].img_per_s_runs)} interleaved repeats"
                      + (f"; top-1 on {ms[0].accuracy_on}" if ms[0].accuracy_on else ""), highlight=False)


@app.command("precision")
def precision_(
    checkpoint: Path = typer.Option(..., help="A vitfab checkpoint or run folder (its val split is used)."),
    data: Optional[Path] = typer.Option(None, help="Labelled folder to check accuracy on [default: the run's val split]."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    tolerance: float = typer.Option(0.01, help="Allowed top-1 drop vs fp32 (0.01 = one point)."),
    candidates: Optional[str] = typer.Option(None, help="Comma list of modes to try [default: all that run here]."),
    repeats: int = typer.Option(3, help="Throughput repeats per mode."),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True),
):
    """Resolve --precision auto: measure every mode, keep the fastest within tolerance of fp32."""
    from .evaluate.api import labelled_samples
    from .evaluate.runner import make_eval_loader
    from .models import load_model
    from .precision import accuracy_table, parse_precision, select_precision
    from .runtime import resolve_device

    dev = resolve_device(device)
    modes = [parse_precision(p, allow_auto=False) for p in _split_list(candidates, "--candidates")] if candidates else None
    net = load_model(checkpoint, "cpu")
    source = labelled_samples(net, str(checkpoint), data, progress)
    if source is None:
        raise VitfabError("no labelled data: give --data DIR, or a run folder whose data is still in place")
    root, samples, desc = source
    loader = make_eval_loader(root, samples, net.vitfab_meta.preprocess)
    choice = select_precision(net, loader, dev, tolerance, modes, repeats=repeats, progress=progress)
    if as_json:
        _print_json({**choice.to_dict(), "data": desc})
        return
    out_console.print(f"top-1 on {desc}, {dev}:", highlight=False)
    for row in accuracy_table(choice):
        acc = _fmt(None if row["accuracy"] is None else 100 * row["accuracy"], "6.2f", "     -")
        out_console.print(f"  {row['precision']:<5} top-1 {acc}%  change {_fmt(row['delta_points'], '+6.2f', '     -')}"
                          f"  img/s {_fmt(row['img_per_s'], '8.1f', '       -')}  x {_fmt(row['speedup'], '5.2f', '    -')}"
                          f"  {row['reason']}", highlight=False)
    out_console.print(f"chosen: {choice.precision}", highlight=False)


# --------------------------------------------------------------------------- architecture search
@nas_app.command("train")
def nas_train(
    data: Optional[Path] = typer.Option(None, help="ImageFolder dataset."),
    space: str = typer.Option("tiny", help="tiny, small, base, or a YAML file with SUPERNET and SEARCH_SPACE."),
    img_size: Optional[int] = typer.Option(None, help="Input size (small-scale runs) [default: the space's, 224]."),
    patch_size: Optional[int] = typer.Option(None, help="Patch size [default: the space's, 16]."),
    sandwich: bool = typer.Option(False, help="Largest + smallest + random subnets per step, in-place distillation."),
    num_random: int = typer.Option(2, help="Random subnets per sandwich step."),
    init_from: Optional[Path] = typer.Option(None, help="A trained vitfab checkpoint copied into the leading slices."),
    global_pool: str = typer.Option("token", help="token (class token) or avg."),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(64, help="Global batch (split over torchrun processes)."),
    lr: Optional[float] = typer.Option(None, help="Peak LR [default: 5e-4]."),
    warmup_epochs: float = typer.Option(2.0),
    drop_path: float = typer.Option(0.1),
    label_smoothing: float = typer.Option(0.1),
    augment: bool = typer.Option(True, help="Random crops/flips/rotations (off: deterministic batches)."),
    amp: str = typer.Option("auto", help="auto, off, bf16, fp16."),
    seed: int = typer.Option(0),
    max_per_class: Optional[int] = typer.Option(None, help="Use at most N images per class (seeded)."),
    device: str = typer.Option("auto"),
    workers: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/supernet-<time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue this supernet run after an interruption."),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True),
):
    """Train an AutoFormer supernet (one process, or `torchrun --nproc_per_node N -m vitfab nas train`)."""
    from .nas import SupernetConfig, resume_supernet, train_supernet
    from .runtime import init_distributed

    init_distributed(device)
    def new_run():
        cfg = SupernetConfig(
            data=str(data), space=space, img_size=img_size, patch_size=patch_size, sandwich=sandwich,
            num_random=num_random, init_from=str(init_from) if init_from else None, global_pool=global_pool,
            epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs, drop_path=drop_path,
            label_smoothing=label_smoothing, augment=augment, amp=amp, seed=seed, max_per_class=max_per_class,
            device=device, workers=workers,
        )
        return train_supernet(cfg, out, progress)

    result = _new_or_resumed(data, resume, new_run, lambda: resume_supernet(resume, progress))
    if result is None:
        return
    summary = {"run": str(result.run.root), "best_epoch": result.best_epoch, "best_val_largest": result.best_val,
               "seconds": round(result.seconds, 1),
               "img_per_s": [round(r.get("img_per_s", 0.0), 1) for r in result.history]}
    if as_json:
        _print_json(summary)
    else:
        out_console.print(f"supernet run: {result.run.root} ({result.seconds:.0f} s)", highlight=False)


@nas_app.command("search")
def nas_search(
    supernet: Path = typer.Option(..., help="A supernet run folder (`vitfab nas train`)."),
    data: Optional[Path] = typer.Option(None, help="Where the run's data lives now [default: as recorded]."),
    max_params: Optional[float] = typer.Option(None, help="Limit, millions of parameters."),
    min_params: Optional[float] = typer.Option(None, help="Lower limit, millions of parameters."),
    max_gmacs: Optional[float] = typer.Option(None, help="Limit, GMACs per image."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Limit, batch-1 latency on --device (measured, cached)."),
    population: int = typer.Option(50),
    generations: int = typer.Option(20),
    parents: int = typer.Option(10, help="Top-k parents per generation."),
    mutations: int = typer.Option(25),
    crossovers: int = typer.Option(25),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    out: Optional[Path] = typer.Option(None, help="Search folder [default: SUPERNET/search]; resumes if present."),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True),
):
    """Evolutionary search (AutoFormer) under limits; candidates scored on the run's validation split."""
    from .data.split import Split
    from .evaluate.runner import make_eval_loader
    from .nas import EvolutionarySearch, Limits, SearchConfig, load_supernet
    from .rundir import RunDir
    from .runtime import resolve_device

    dev = resolve_device(device)
    run = RunDir.open(supernet)
    net = load_supernet(supernet, dev)
    split = Split.load(run.split_path)
    root = data or Path(split.root)
    if not split.val:
        raise VitfabError(f"{supernet} has no validation split to score candidates on")
    if not Path(root).is_dir():
        raise VitfabError(f"data folder of this run not found: {root} (pass --data to point to it)")
    limits = Limits(None if max_params is None else max_params * 1e6, None if min_params is None else min_params * 1e6,
                    max_gmacs, max_latency_ms)
    cfg = SearchConfig(population, generations, parents, mutations, crossovers, seed=seed)
    loader = make_eval_loader(root, split.val, net.vitfab_meta.preprocess)
    result = EvolutionarySearch(net, loader, dev, limits, cfg, out or run.root / "search", progress).run()
    b = result.best
    summary = {"best": b.to_dict(), "evaluated": result.evaluated, "seconds": round(result.seconds, 1),
               "pareto": [c.to_dict() for c in result.pareto], "out": str(result.out)}
    if as_json:
        _print_json(summary)
        return
    out_console.print(f"best of {result.evaluated} candidates ({limits.describe()}): {b.arch.short()}\n"
                      f"  val top-1 {100 * b.accuracy:.2f}% (supernet weights), {b.params / 1e6:.2f}M params, "
                      f"{b.gmacs:.3f} GMACs\n  {len(result.pareto)} on the Pareto front; files in {result.out} "
                      f"(best.yaml, candidates.yaml, pareto.csv)", highlight=False)


@nas_app.command("extract")
def nas_extract(
    subnet: str = typer.Option(..., help="Architecture YAML (RETRAIN shape), e.g. SUPERNET/search/best.yaml, or "
                                         "a published one: AutoFormer-T, AutoFormer-S, AutoFormer-B."),
    out: Path = typer.Option(..., help="Checkpoint folder to write (loads with vitfab.load_model)."),
    supernet: Optional[Path] = typer.Option(None, help="A supernet run folder or checkpoint (vitfab nas train)."),
    official_checkpoint: Optional[Path] = typer.Option(None, help="A supernet released by the AutoFormer authors."),
    space: str = typer.Option("tiny", help="With --official-checkpoint: tiny, small, base or a YAML file."),
):
    """Slice a subnet out of a supernet as a standalone timm VisionTransformer."""
    from .measure import count_macs, count_params
    from .models import load_model
    from .models.arch import load_arch
    from .nas import extract_to, load_supernet
    from .nas.official import PUBLISHED, load_official_autoformer, published_arch

    if (supernet is None) == (official_checkpoint is None):
        raise VitfabError("give exactly one of --supernet RUN_DIR or --official-checkpoint PATH")
    if subnet.upper().startswith("AUTOFORMER-") and subnet.upper()[-1] in PUBLISHED and not Path(subnet).exists():
        arch = published_arch(subnet)
    else:
        arch = load_arch(subnet)
    net = load_supernet(supernet) if supernet else load_official_autoformer(official_checkpoint, space)
    folder = extract_to(net, arch, out, str(supernet or official_checkpoint))
    model = load_model(folder)
    out_console.print(f"{model.vitfab_meta.name}: {count_params(model) / 1e6:.2f}M params, "
                      f"{count_macs(model) / 1e9:.3f} GMACs -> {folder}", highlight=False)


# --------------------------------------------------------------------------- token merging
@tome_app.command("visualize")
def tome_visualize(
    checkpoint: Path = typer.Option(..., help="A vitfab checkpoint or run folder."),
    image: Path = typer.Option(..., help="The image to show the merges on."),
    r: str = typer.Option("8", "--r", help="ToMe schedule: R, R:INFLECTION, R1/R2/..., keep=F or macs=F."),
    out: Path = typer.Option(Path("tome.png"), help="PNG: the image | its merged patch groups."),
):
    """Colour each group of merged patches (ToMe source tracing) over the image."""
    from .models import load_model
    from .tome.visualize import visualize_merges

    if not image.is_file():
        raise VitfabError(f"image not found: {image}")
    summary = visualize_merges(load_model(checkpoint, "cpu"), image, r, out)
    out_console.print(f"{summary['patches']} patches -> {summary['groups']} tokens; predicted "
                      f"{summary['predicted']} ({100 * summary['confidence']:.1f}%) -> {out}", highlight=False)


# --------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="New folder for the ImageFolder dataset."),
    n_per_class: int = typer.Option(300, help="Images per class."),
    img_size: int = typer.Option(64, help="Image side in pixels."),
    seed: int = typer.Option(0),
    difficulty: float = typer.Option(0.5, help="0 = blatant defects, 1 = subtle and noisy."),
    progress: bool = typer.Option(True),
):
    """Simulated 3D X-ray images of BGA solder joints: 7 classes, 3 slices as channels."""
    from .data.synth import CLASSES, SynthConfig, synthesize
    from .progress import task

    cfg = SynthConfig(n_per_class=n_per_class, img_size=img_size, seed=seed, difficulty=difficulty)
    with task("synthesising", total=n_per_class * len(CLASSES), enabled=progress) as advance:
        meta = synthesize(out, cfg, on_progress=advance)
    out_console.print(f"{n_per_class * len(CLASSES)} images ({len(CLASSES)} classes, {img_size} px) "
                      f"in {meta['seconds']:.1f} s -> {out}", highlight=False)


@data_app.command("info")
def data_info(
    data: Path = typer.Argument(..., help="ImageFolder dataset."),
    skip_bad_images: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True),
):
    """Check every image; print class counts and the imbalance ratio."""
    from .data.images import scan_checked

    index = scan_checked(data, skip_bad_images, progress)
    counts = index.class_counts()
    ratio = max(counts.values()) / max(min(counts.values()), 1)
    if as_json:
        _print_json({"classes": counts, "images": len(index.samples), "imbalance_ratio": ratio,
                     "skipped": index.skipped})
        return
    width = max(len(c) for c in counts)
    for c, n in counts.items():
        out_console.print(f"{c:<{width}}  {n:6d}", highlight=False)
    out_console.print(f"{len(index.samples)} images, {len(counts)} classes, imbalance {ratio:.2f}",
                      highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line on stderr and exit 2, never a traceback.

    Usage errors (unknown option, missing value) are reported by typer itself, also with 2.
    """
    try:
        app(args=argv, prog_name="vitfab")
    except SystemExit as exc:  # typer's standalone mode: --help, usage errors, Exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except VitfabError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
