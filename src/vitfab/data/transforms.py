"""Preprocessing built with timm's ``create_transform``, with defaults for inspection images.

Training: a mild random-resized crop (a defect near the border must survive it), horizontal
and vertical flips and 90-degree rotations (an inspection image has no "up"), and no colour
jitter: in X-ray and many optical images, intensity carries meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from timm.data import create_transform
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How images become tensors; stored with every checkpoint."""

    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class RandomRot90(torch.nn.Module):
    """Rotate a PIL image by a uniformly drawn multiple of 90 degrees."""

    def forward(self, img):
        k = int(torch.randint(0, 4, ()).item())
        return img if k == 0 else img.rotate(90 * k)


def train_transform(
    pre: Preprocess,
    scale: tuple[float, float] = (0.8, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.5,
    rot90: bool = True,
):
    primary, secondary, final = create_transform(
        pre.img_size,
        is_training=True,
        scale=scale,
        ratio=(0.9, 1.1),
        hflip=hflip,
        vflip=vflip,
        color_jitter=None,
        auto_augment=None,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        separate=True,
    )
    steps = list(primary.transforms) + ([RandomRot90()] if rot90 else [])
    return T.Compose(steps + list(secondary.transforms) + list(final.transforms))


def eval_transform(pre: Preprocess):
    return create_transform(
        pre.img_size,
        is_training=False,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=pre.crop_pct,
    )
