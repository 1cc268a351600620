"""``TrainConfig``: every knob of a fine-tuning run, saved to the run folder.

Each field is also a ``vitfab train`` option (same name with dashes, same default, this help).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..data.split import DataSettings
from ..errors import VitfabError
from ..models.arch import load_arch
from ..models.checkpoint import read_meta
from ..models.subnet import subnet_kwargs
from ..options import option, parse_key_values
from ..rundir import resolve_weights
from ..runtime import AMP_MODES
from ..tome import Schedule
from .sampling import BALANCE_MODES, SELECT_METRICS

DISTILL_MODES = ("soft", "hard")


@dataclass
class TrainConfig(DataSettings):
    data: str | None = option(None, help="ImageFolder dataset (<class>/<image>).")
    model: str = option("deit_tiny_patch16_224", help="timm ViT name; the reference is deit_base_patch16_224.")
    img_size: int | None = option(None, help="Override the input size (position embeddings resized).")
    patch_size: int | None = option(None, help="Override the patch size.")
    model_args: dict[str, Any] = option(default_factory=dict, flag="model-arg", cli_type=list[str], cli_default=[],
                                        parse=parse_key_values,
                                        help="Extra timm argument KEY=VALUE (e.g. depth=6); repeatable.")
    pretrained: bool = option(False, help="Start from timm's hub weights (needs the network).")
    weights: str | None = option(None, help="Start from a local .safetensors/.pth/.pt file.")
    arch: str | None = option(None, help="Train an AutoFormer subnet (a RETRAIN YAML) as a standalone model "
                                         "(vitfab_subnet); e.g. the best.yaml of `vitfab nas search`.")
    init_checkpoint: str | None = option(None, help="Fine-tune a vitfab checkpoint (e.g. an extracted subnet): its "
                                                    "architecture and weights; head replaced for other classes, "
                                                    "position embedding resized.")
    tome: str | None = option(None, flag="tome-r", help="Train with token merging on: R, R:INFLECTION, R1/R2/..., "
                                                        "keep=F or macs=F (recorded in the checkpoints).")
    # knowledge distillation from a trained vitfab checkpoint (same classes): DeiT's soft or hard form
    teacher: str | None = option(None, help="Distil from this trained vitfab checkpoint (same classes).")
    distill: str = option("soft", help="With --teacher: soft, (1-a) CE + a T^2 KL(student/T || teacher/T); or hard, "
                                       "CE(labels)/2 + CE(teacher argmax)/2.")
    distill_alpha: float = option(0.5, help="With --teacher --distill soft: weight a of the KL term.")
    distill_tau: float = option(1.0, help="With --teacher --distill soft: temperature T.")
    # the DeiT fine-tuning recipe
    epochs: int = option(30, help="Training epochs.")
    batch_size: int = option(64, help="Global batch (split over torchrun processes).")
    lr: float | None = option(None, help="Peak LR [default: 5e-4 from scratch, 1e-4 from weights].")
    weight_decay: float = option(0.05, help="AdamW weight decay (none on norms, biases, tokens).")
    warmup_epochs: float = option(2.0, help="Linear warm-up before the cosine decay.")
    min_lr: float = option(1e-6, help="LR at the end of the cosine decay.")
    label_smoothing: float = option(0.1, help="Label smoothing of the cross-entropy.")
    mixup: float = option(0.0, help="Mixup alpha (DeiT: 0.8); 0 = off.")
    cutmix: float = option(0.0, help="CutMix alpha (DeiT: 1.0); 0 = off.")
    drop_path: float = option(0.1, help="Stochastic depth rate.")
    augment: bool = option(True, help="Random crops/flips/rotations in training (off: deterministic batches).")
    balance: str = option("auto", help="Imbalanced classes: sampler (class-balanced sampling), weights (loss "
                                       "re-weighting) or none; auto: sampler where the largest class has more "
                                       "than 3x the images of the smallest.")
    select_on: str = option("auto", help="The validation metric that picks the best epoch: top1, macro_f1, "
                                         "balanced_accuracy, or auto (macro_f1 where the classes are imbalanced, "
                                         "else top1).")
    epoch_fraction: float = option(1.0, help="Share of the training images each epoch sees (fewer steps).")
    time_limit: float | None = option(None, help="Stop before an epoch that would end past this many seconds "
                                                 "(at the mean epoch time so far).")
    clip_grad: float | None = option(None, help="Clip the gradient norm to this value.")
    amp: str = option("auto", help="auto (bf16 on CPUs with native bf16, fp16 on CUDA), off, bf16, fp16.")
    accum_steps: int = option(1, help="Gradient accumulation steps.")
    # execution
    device: str = option("auto", help="auto, cpu or cuda.")
    workers: int | None = option(None, help="DataLoader workers [default: 0 on <=2 cores].")

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if (self.pretrained or self.weights) else 5e-4

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.accum_steps >= 1, f"--accum-steps must be at least 1, got {self.accum_steps}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (0 <= self.drop_path < 1, f"--drop-path must lie in [0, 1), got {self.drop_path}"),
            (self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp}"),
            (
                not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
                "mixup/cutmix need an even --batch-size",
            ),
            (self.max_per_class is None or self.max_per_class >= 1, "--max-per-class must be at least 1"),
            (self.distill in DISTILL_MODES, f"--distill must be one of {', '.join(DISTILL_MODES)}, got {self.distill}"),
            (0 <= self.distill_alpha <= 1, f"--distill-alpha must lie in [0, 1], got {self.distill_alpha}"),
            (self.distill_tau > 0, f"--distill-tau must be positive, got {self.distill_tau}"),
            (self.balance in BALANCE_MODES, f"--balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance}"),
            (self.select_on in SELECT_METRICS,
             f"--select-on must be one of {', '.join(SELECT_METRICS)}, got {self.select_on}"),
            (0 < self.epoch_fraction <= 1, f"--epoch-fraction must lie in (0, 1], got {self.epoch_fraction}"),
            (self.time_limit is None or self.time_limit > 0, "--time-limit must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise VitfabError(msg)
        if self.tome is not None:
            Schedule.parse(self.tome)

    def resolved(self) -> "TrainConfig":
        """A copy whose architecture is spelled out: ``arch`` (a subnet YAML) and
        ``init_checkpoint`` (a vitfab checkpoint) become the model name, its arguments, weights
        and sizes they stand for; the copy has neither (what a run folder records)."""
        if self.init_checkpoint is not None:
            if self.arch is not None or self.weights is not None or self.pretrained:
                raise VitfabError("--init-checkpoint brings its own architecture and weights: drop --arch/--weights/"
                                  "--pretrained")
            inherited = checkpoint_model_args(self.init_checkpoint)
            return dataclasses.replace(
                self, init_checkpoint=None, model=inherited["model"], weights=inherited["weights"],
                model_args=inherited["model_args"] | self.model_args,
                patch_size=self.patch_size or inherited["patch_size"], img_size=self.img_size or inherited["img_size"])
        if self.arch is not None:
            return dataclasses.replace(self, arch=None, model="vitfab_subnet",
                                       model_args=subnet_kwargs(load_arch(self.arch)) | self.model_args)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def checkpoint_model_args(path: str | Path) -> dict[str, Any]:
    """The ``TrainConfig`` fields that fine-tune a vitfab checkpoint (e.g. an extracted subnet):
    its architecture name and arguments, its weights file, its patch and input size. The class
    count, input size and drop-path rate stay the new run's to set."""
    weights_file = resolve_weights(Path(path))
    meta = read_meta(weights_file)
    own = ("num_classes", "img_size", "patch_size", "drop_path_rate")
    return {"model": meta.name, "weights": str(weights_file),
            "model_args": {k: v for k, v in meta.kwargs.items() if k not in own},
            "patch_size": meta.kwargs.get("patch_size"), "img_size": meta.preprocess.img_size}
