"""Fine-tuning in the DeiT tradition, resumable after a kill at any instant.

AdamW (no weight decay on norms, biases, position/class tokens), linear warm-up then cosine
decay per optimizer step, label smoothing, optional mixup/cutmix, drop-path, mixed precision
(bf16 autocast on a CPU with native bf16, fp16 with a gradient scaler on CUDA), gradient
accumulation.

Reproducibility and resume: every epoch reseeds torch, numpy, ``random`` and the data
loader's shuffling from ``(seed, epoch)``. After each epoch the run folder gets a metrics
line and an atomically written ``last`` checkpoint holding weights, optimizer, scheduler and
scaler state; ``best`` follows validation top-1. ``resume`` restarts after the last complete
epoch, so a killed run loses at most the epoch in progress and then continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

from ..data.dataset import ImageListDataset
from ..data.images import scan_checked
from ..data.split import Split, make_split
from ..data.transforms import eval_transform, train_transform
from ..errors import VitfabError
from ..evaluate.metrics import classification_metrics
from ..evaluate.runner import collect_logits, make_eval_loader, plot_confusion
from ..files import write_json_atomic
from ..lock import run_lock
from ..models.checkpoint import read_meta, save_checkpoint
from ..models.factory import check_model_name, create_model, describe
from ..progress import console, make_progress
from ..rundir import RunDir, resolve_weights
from ..runtime import (autocast, barrier, broadcast_object, default_workers, resolve_amp, resolve_device, rng_restored,
                       seed_everything, seeded, world)
from ..runtimes import load_model
from ..tome import apply as apply_tome
from .config import TrainConfig
from .resume import resume_run
from .sampling import ShareSampler, balanced_weights, class_loss_weights, epoch_seed, warmup_cosine


@dataclass
class TrainResult:
    run: RunDir
    best_epoch: int
    best_val: dict[str, Any]
    test: dict[str, Any] | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_after: int | None = None  # the epoch count a time limit cut the run to
    select_on: str = "top1"  # the validation metric that picked the best epoch
    balance: str = "none"  # how class imbalance was countered


def resolved_policy(config: TrainConfig, split: Split) -> tuple[str, str]:
    """(the selection metric, the balancing) a run uses: ``auto`` follows the split's imbalance."""
    select_on = split.selection_metric() if config.select_on == "auto" else config.select_on
    balance = ("sampler" if split.imbalanced else "none") if config.balance == "auto" else config.balance
    return select_on, balance


def prepare_split(config: TrainConfig, progress: bool = True) -> Split:
    """Scan and check the data folder, then draw the seeded stratified split."""
    index = scan_checked(config.data, config.skip_bad_images, progress, max_pixels=config.max_image_pixels)
    return make_split(index, config.val_fraction, config.test_fraction, config.seed, config.max_per_class)


def report_split(split: Split) -> str:
    counts = split.class_counts()
    width = max(len(c) for c in split.classes)
    lines = [f"{'class':<{width}}  train    val   test"]
    for c in split.classes:
        lines.append(f"{c:<{width}}  {counts['train'][c]:5d}  {counts['val'][c]:5d}  {counts['test'][c]:5d}")
    lines.append(f"imbalance (largest/smallest class): {split.imbalance_ratio():.2f}"
                 + (" -- imbalanced: checkpoints are chosen on macro-F1" if split.imbalanced else ""))
    return "\n".join(lines)


def build_model(config: TrainConfig, classes: list[str], with_weights: bool = True):
    """The model of a (resolved) run config; its initial weights depend on ``config.seed`` alone
    (drawn under :func:`seeded`, so the caller's random state is left as it was)."""
    with seeded(config.seed):
        model = create_model(
            config.model,
            classes=classes,
            img_size=config.img_size,
            patch_size=config.patch_size,
            pretrained=config.pretrained and with_weights,
            weights=config.weights if with_weights else None,
            drop_path_rate=config.drop_path,
            **config.model_args,
        )
    model.vitfab_meta.preprocess.crop_pct = 1.0  # inspection images: keep the borders
    if config.tome is not None:  # fine-tune with token merging on (gradients flow through merges)
        apply_tome(model, config.tome)
    return model


class Trainer:
    unused_parameters = False  # DDP: True where a step may leave parameters out (a supernet's deeper blocks)

    def __init__(self, run: RunDir, config: TrainConfig, split: Split, progress: bool = True):
        config.validate()
        self.run, self.config, self.split, self.progress = run, config, split, progress
        self.device = resolve_device(config.device)
        self.amp = resolve_amp(config.amp, self.device)
        self.workers = default_workers() if config.workers is None else config.workers
        self.rank, self.world = world()
        self.progress = progress and self.rank == 0
        if self.world > 1 and config.batch_size % self.world:
            raise VitfabError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                              f"{self.world} processes")
        if self.world > 1 and (config.mixup or config.cutmix) and (config.batch_size // self.world) % 2:
            raise VitfabError(f"mixup/cutmix pair images within each process: --batch-size {config.batch_size} "
                              f"over {self.world} processes leaves an odd share")
        self.select_on, self.balance = resolved_policy(config, split)
        labels = [y for _, y in split.train]
        self.sample_weights = balanced_weights(labels, len(split.classes)) if self.balance == "sampler" else None
        self.class_weights = class_loss_weights(labels, len(split.classes)) if self.balance == "weights" else None

    # --- setup -------------------------------------------------------------------------
    def _train_loader(self, epoch: int) -> DataLoader:
        transform = train_transform(self.pre) if self.config.augment else eval_transform(self.pre)
        ds = ImageListDataset(self.split.root, self.split.train, transform)
        g = torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch))
        mixing = bool(self.config.mixup or self.config.cutmix)
        batch = min(self.config.batch_size, len(ds))
        if mixing:  # mixup pairs images: it needs an even batch
            batch = max(2, batch - batch % 2)
        count = max(batch, int(round(len(ds) * self.config.epoch_fraction)))
        drop_last = (mixing or count >= 4 * batch or self.world > 1) and count >= batch
        sampler = ShareSampler(len(ds), batch, self.rank, self.world, g, drop_last, self.sample_weights, count,
                               sample_seed=epoch_seed(self.config.seed, epoch) if self.config.augment else None)
        return DataLoader(ds, batch_size=sampler.local_batch, sampler=sampler, generator=g,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self._train_loader(0)) / self.config.accum_steps)

    def setup(self, model) -> None:
        c = self.config
        if self.world > 1 and self.device.type == "cuda":  # batch statistics over the global batch, as in one process
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (CPU: over each process's share)
        self.model = model.to(self.device)
        self.train_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids,
                                                       find_unused_parameters=self.unused_parameters)
        self.pre = model.vitfab_meta.preprocess
        lr = c.resolved_lr()
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=lr, weight_decay=c.weight_decay)
        spe = self._steps_per_epoch()
        total = spe * c.epochs
        warmup = min(int(round(c.warmup_epochs * spe)), max(total - 1, 0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, warmup, lr, min(c.min_lr, lr))
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.mixup = None
        if c.mixup or c.cutmix:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, label_smoothing=c.label_smoothing,
                num_classes=len(self.split.classes),
            )
        self.start_epoch, self.best, self.best_epoch = 0, (-1.0, -1.0), -1
        self.teacher = self.load_teacher() if c.teacher else None

    def load_teacher(self):
        """The distillation teacher: a trained vitfab checkpoint over the same classes, frozen."""
        teacher = load_model(self.config.teacher, self.device)
        if list(teacher.vitfab_meta.classes) != list(self.split.classes):
            raise VitfabError(f"the teacher {self.config.teacher} knows classes {teacher.vitfab_meta.classes}, "
                              f"this run {self.split.classes}")
        t, s = teacher.vitfab_meta.preprocess, self.pre
        if (t.img_size, tuple(t.mean), tuple(t.std)) != (s.img_size, tuple(s.mean), tuple(s.std)):
            raise VitfabError(f"the teacher {self.config.teacher} takes {t.img_size} px images normalised with mean "
                              f"{tuple(t.mean)}, this run feeds {s.img_size} px with mean {tuple(s.mean)}: "
                              f"distil from a teacher trained at this run's size")
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = tuple(state["best"])
        self.best_epoch = int(state["best_epoch"])

    # --- one epoch ----------------------------------------------------------------------
    def train_one_epoch(self, epoch: int, progress) -> dict[str, float]:
        c, model, opt = self.config, self.model, self.optimizer
        # drop-path and mixup differ per rank; the data order, each image's augmentation (drawn from
        # its place in the epoch, ShareSampler) and the subnet draws do not
        seed_everything(epoch_seed(c.seed, epoch) + 7919 * self.rank)
        loader = self._train_loader(epoch)
        model.train()
        total = len(loader.sampler)
        tid = progress.add_task(f"epoch {epoch + 1}/{c.epochs}", total=total, info="")
        n_seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            loss, out = self.train_step(x, target, epoch, i)
            if (i + 1) % c.accum_steps == 0 or i + 1 == len(loader):
                if self.scaler:
                    self.scaler.unscale_(opt)
                if c.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad)
                if self.scaler:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                self.scheduler.step()
            n = len(y)
            n_seen += n
            loss_sum += loss.item() * n
            correct += int((out.argmax(1) == y).sum())
            ips = n_seen / max(time.perf_counter() - t0, 1e-9)
            progress.update(
                tid, advance=n,
                info=f"loss {loss_sum / n_seen:.3f}  acc {100 * correct / n_seen:.1f}%  {ips:.0f} img/s",
            )
        seconds = time.perf_counter() - t0
        return {
            "train_loss": loss_sum / max(n_seen, 1),
            "train_acc": correct / max(n_seen, 1),
            "img_per_s": n_seen / max(seconds, 1e-9),
            "train_seconds": seconds,
        }

    def loss_of(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing, or against mixed soft targets."""
        if self.mixup is not None:
            return torch.sum(-target * F.log_softmax(out, dim=-1), dim=-1).mean()
        weight = None if self.class_weights is None else self.class_weights.to(out.device)
        return F.cross_entropy(out, target, weight=weight, label_smoothing=self.config.label_smoothing)

    def backward(self, loss: torch.Tensor, epoch: int) -> None:
        if not torch.isfinite(loss):
            raise VitfabError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr or use --amp off")
        scaled = loss / self.config.accum_steps
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def train_step(self, x: torch.Tensor, target: torch.Tensor, epoch: int, step: int):
        """Forward and backward of one batch; returns (loss, logits). Subclasses change what runs."""
        with autocast(self.device, self.amp):
            out = self.train_model(x)
        out = out.float()
        loss = self.loss_of(out, target)
        if self.teacher is not None:
            loss = self.distill_loss(x, out, loss)
        self.backward(loss, epoch)
        return loss, out

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's fp32 logits of a batch, computed once per batch (several subnets of a
        sandwich step learn from the same ones)."""
        if getattr(self, "_teacher_batch", None) is not x:
            self.teacher.eval()  # a BatchNorm teacher must not update its statistics
            with torch.no_grad(), autocast(self.device, self.amp):
                self._teacher_out = self.teacher(x).float()
            self._teacher_batch = x
        return self._teacher_out

    def distill_loss(self, x: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """DeiT's distillation through the class token: soft (KL to the teacher's tempered
        distribution, weight alpha) or hard (the teacher's argmax as a second label, half weight)."""
        c = self.config
        t = self.teacher_logits(x)
        if c.distill == "hard":
            return 0.5 * loss + 0.5 * F.cross_entropy(out, t.argmax(dim=-1))
        tau = c.distill_tau
        kl = F.kl_div(F.log_softmax(out / tau, dim=-1), F.log_softmax(t / tau, dim=-1), reduction="batchmean",
                      log_target=True)
        return (1 - c.distill_alpha) * loss + c.distill_alpha * tau * tau * kl

    def validate(self, progress=None) -> dict[str, Any]:
        loader = make_eval_loader(self.split.root, self.split.val, self.pre, self.config.batch_size, self.workers)
        logits, targets = collect_logits(self.model, loader, self.device, self.amp, self.progress, "validate",
                                         parent=progress)
        m = classification_metrics(logits, targets, self.split.classes, self.config.good_class)
        lt = torch.from_numpy(logits).float()
        m["loss"] = float(F.cross_entropy(lt, torch.from_numpy(targets))) if len(targets) else float("nan")
        return m

    # --- the run ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train the remaining epochs, test the best checkpoint. Every epoch reseeds the global RNGs
        from (seed, epoch) for its augmentations and drop-path; the caller's states are restored."""
        with rng_restored():
            return self._fit()

    def _fit(self) -> TrainResult:
        c, run = self.config, self.run
        t_start, stopped = time.perf_counter(), None
        history = [r for r in run.read_metrics() if r.get("epoch", 0) < self.start_epoch]
        with make_progress(self.progress) as progress:
            for epoch in range(self.start_epoch, c.epochs):
                stats = self.train_one_epoch(epoch, progress)
                val = self.validate(progress) if self.split.val else None
                record = {
                    "epoch": epoch,
                    **{k: round(v, 6) for k, v in stats.items()},
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                if val is not None:
                    record.update(val_loss=round(val["loss"], 6), val_top1=val["top1"], val_macro_f1=val["macro_f1"],
                                  val_balanced_accuracy=val["balanced_accuracy"])
                    for key in ("escape_rate", "overkill_rate"):
                        if key in val:
                            record[f"val_{key}"] = val[key]
                other = "top1" if self.select_on == "macro_f1" else "macro_f1"
                score = (val[self.select_on], val[other]) if val is not None else (float(epoch), 0.0)
                history.append(record)
                improved = score > self.best
                if improved:
                    self.best, self.best_epoch = score, epoch
                if self.rank == 0:  # under torchrun the weights are identical on every rank
                    self.save_epoch(record, improved, val)
                barrier()
                msg = f"epoch {epoch + 1}/{c.epochs}: train loss {stats['train_loss']:.3f}"
                if val is not None:
                    msg += f", val top-1 {100 * val['top1']:.1f}%, macro-F1 {val['macro_f1']:.3f}"
                if self.rank == 0:
                    progress.console.print(msg)
                elapsed = time.perf_counter() - t_start  # stop where the next epoch would end past the limit
                late = c.time_limit is not None and elapsed * (epoch + 2 - self.start_epoch) / (
                    epoch + 1 - self.start_epoch) > c.time_limit
                late = broadcast_object(late)  # rank 0's clock decides: the ranks stop together
                if late and epoch + 1 < c.epochs:
                    stopped = epoch + 1
                    if self.rank == 0:
                        progress.console.print(f"time limit of {c.time_limit:.0f} s: the next epoch would end past "
                                               f"it, stopping after epoch {stopped} of {c.epochs}")
                    break
        seconds = time.perf_counter() - t_start
        best_val = next((r for r in history if r["epoch"] == self.best_epoch), {})
        test = self.test() if self.split.test and self.rank == 0 else None
        if self.rank == 0:
            run.set_status("done")
        barrier()
        return TrainResult(run, self.best_epoch, best_val, test, seconds, history, stopped, self.select_on,
                           self.balance)

    def save_epoch(self, record: dict[str, Any], improved: bool, val: dict[str, Any] | None) -> None:
        """Order matters for resume: metrics line, then best, then last (see module doc)."""
        run, epoch = self.run, record["epoch"]
        run.append_metrics(record)
        extra = {"epoch": epoch, "run": str(run.root)}
        if improved:
            save_checkpoint(run.checkpoint("best"), self.model, extra | {"val": _brief(val)})
        save_checkpoint(
            run.checkpoint("last"), self.model, extra,
            train_state={
                "epoch": epoch,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "best": list(self.best),
                "best_epoch": self.best_epoch,
            },
        )

    def test(self) -> dict[str, Any]:
        """The best checkpoint, once, on the test split; metrics and confusion PNG in eval/."""
        model = load_model(self.run.find_checkpoint("best"), self.device)
        loader = make_eval_loader(self.split.root, self.split.test, self.pre, self.config.batch_size, self.workers)
        logits, targets = collect_logits(model, loader, self.device, "off", self.progress, "test")
        m = classification_metrics(logits, targets, self.split.classes, self.config.good_class)
        m["checkpoint"] = "best"
        m["epoch"] = self.best_epoch
        write_json_atomic(self.run.eval_dir / "test.json", m)
        plot_confusion(m, self.run.eval_dir / "confusion_test.png")
        return m


def _brief(val: dict[str, Any] | None) -> dict[str, Any]:
    if val is None:
        return {}
    return {k: val[k] for k in ("top1", "macro_f1", "balanced_accuracy", "loss", "escape_rate", "overkill_rate")
            if k in val}


def check_config(config: TrainConfig) -> None:
    """The cheap checks, before any image is read: values, device, model name, weights file."""
    if config.data is None:
        raise VitfabError("--data DIR is required (or --resume RUN_DIR)")
    config.validate()
    resolve_amp(config.amp, resolve_device(config.device))
    check_model_name(config.model)
    if config.weights and not Path(config.weights).is_file():
        raise VitfabError(f"weights file not found: {config.weights}")
    if config.teacher:
        if not Path(config.teacher).exists():
            raise VitfabError(f"teacher checkpoint not found: {config.teacher}")
        size = read_meta(resolve_weights(Path(config.teacher))).preprocess.img_size
        if config.img_size is not None and size != config.img_size:
            raise VitfabError(f"the teacher {config.teacher} takes {size} px images, this run {config.img_size} px")


def train(
    config: TrainConfig, out: str | Path | None = None, progress: bool = True, split: Split | None = None
) -> TrainResult:
    """A new run: check data, split, build the model, fine-tune, test the best checkpoint.

    Every check (config, device, data, model, weights) runs before the run folder is made.
    """
    config = config.resolved()
    check_config(config)
    split = split or prepare_split(config, progress and world()[0] == 0)
    model = build_model(config, split.classes)
    select_on, balance = resolved_policy(config, split)
    run = start_run(out, "train", {"kind": "train", "status": "running", "train": config.to_dict(),
                                   "lr": config.resolved_lr(), "select_on": select_on, "balance": balance}, split,
                    describe(model))
    with run_lock(run.root):
        trainer = Trainer(run, config, split, progress)
        trainer.setup(model)
        return trainer.fit()


def start_run(out: str | Path | None, prefix: str, config: dict[str, Any], split: Split, summary: str) -> RunDir:
    """Make the run folder on rank 0 (the only one that writes), tell every rank where it is."""
    root = None
    if world()[0] == 0:
        run = RunDir.create(out, prefix=prefix)
        split.save(run.split_path)
        n = world()[1]  # the global batch is the configured one, each process takes its share
        per = {"batch_per_process": config["train"]["batch_size"] // n} if "train" in config else {}
        run.write_config(config | {"world_size": n} | per)
        console.print(f"run folder: {run.root}")
        console.print(report_split(split))
        console.print(summary)
        root = str(run.root)
    return RunDir.open(broadcast_object(root))


def resume(run_dir: str | Path, progress: bool = True) -> TrainResult:
    """Continue a training run after its last complete epoch (e.g. after ``kill -9``)."""
    return resume_run(run_dir, "train", TrainConfig, build_model, Trainer, progress)
