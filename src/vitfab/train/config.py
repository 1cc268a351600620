"""``TrainConfig``: every knob of a fine-tuning run, saved to the run folder."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import VitfabError
from ..runtime import AMP_MODES


DISTILL_MODES = ("soft", "hard")


@dataclass
class TrainConfig:
    data: str
    model: str = "deit_tiny_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    tome: str | None = None  # ToMe schedule to train with (R, R:INFLECTION, list, keep=F, macs=F)
    # knowledge distillation from a trained vitfab checkpoint (same classes): DeiT's soft or hard form
    teacher: str | None = None
    distill: str = "soft"  # soft: (1-a) CE + a T^2 KL(student/T || teacher/T); hard: CE(labels)/2 + CE(teacher argmax)/2
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    # the DeiT fine-tuning recipe
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = None  # None: 5e-4 from scratch, 1e-4 from pretrained/local weights
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float = 0.1
    augment: bool = True  # off: the evaluation transform in training too (deterministic batches)
    clip_grad: float | None = None
    amp: str = "auto"
    accum_steps: int = 1
    seed: int = 0
    # data
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_per_class: int | None = None
    skip_bad_images: bool = False
    good_class: str | None = None
    # execution
    device: str = "auto"
    workers: int | None = None

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
        ]
        for ok, msg in checks:
            if not ok:
                raise VitfabError(msg)
        if self.tome is not None:
            from ..tome import Schedule

            Schedule.parse(self.tome)

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
    from ..models.checkpoint import read_meta, resolve_weights

    weights_file = resolve_weights(Path(path))
    meta = read_meta(weights_file)
    own = ("num_classes", "img_size", "patch_size", "drop_path_rate")
    return {"model": meta.name, "weights": str(weights_file),
            "model_args": {k: v for k, v in meta.kwargs.items() if k not in own},
            "patch_size": meta.kwargs.get("patch_size"), "img_size": meta.preprocess.img_size}
