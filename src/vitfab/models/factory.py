"""``create_model``: any timm Vision Transformer by name, resized and with local weights."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from ..data.transforms import Preprocess
from ..errors import CheckpointError, VitfabError
from .meta import ModelMeta
from .weights import load_weights

BASELINE = "deit_base_patch16_224"


def check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    candidates = timm.list_models("*vit*") + timm.list_models("deit*")
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise VitfabError(f"unknown timm model '{name}'{hint}")


def create_model(
    name: str = BASELINE,
    num_classes: int | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    classes: list[str] | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Build a timm ``VisionTransformer`` (DeiT, ViT, ...) by name.

    ``img_size`` / ``patch_size`` override the architecture for small-scale runs (position
    and patch embeddings of loaded weights are resized to fit); other keyword arguments go to
    timm (``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...).
    ``pretrained`` takes timm's hub weights (needs the network); ``weights`` a local
    ``.safetensors`` or ``.pth/.pt`` file. With a different class count the classifier head
    is re-initialised. The returned model carries ``model.vitfab_meta`` (a :class:`ModelMeta`).
    """
    check_model_name(name)
    if pretrained and weights:
        raise VitfabError("use either --pretrained (hub weights) or --weights PATH, not both")
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise VitfabError(f"num_classes={num_classes} but {len(classes)} class names given")
        num_classes = len(classes)
    kwargs: dict[str, Any] = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise CheckpointError(
                f"could not fetch pretrained weights for {name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); offline? "
                "pass a local file with --weights PATH"
            ) from None
        raise VitfabError(f"cannot build {name} with {kwargs}: {exc}") from None
    except TypeError as exc:
        raise VitfabError(f"cannot build {name} with {kwargs}: {exc}") from None
    if not isinstance(model, VisionTransformer):
        raise VitfabError(f"{name} is a {type(model).__name__}; vitfab works on timm VisionTransformer models")
    if weights:
        load_weights(model, weights)
    cfg = model.pretrained_cfg or {}
    pre = Preprocess(
        img_size=int(model.patch_embed.img_size[0]),
        mean=tuple(cfg.get("mean", Preprocess.mean)),
        std=tuple(cfg.get("std", Preprocess.std)),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=float(cfg.get("crop_pct", 1.0)) if (pretrained or weights) and not img_size else 1.0,
    )
    model.vitfab_meta = ModelMeta(
        name=name,
        kwargs={k: v for k, v in kwargs.items()},
        classes=list(classes) if classes is not None else default_class_names(model.num_classes),
        preprocess=pre,
    )
    return model


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k synset ids (the val-folder names) for 1000 classes, else ``"0"``, ``"1"``, ..."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return [str(i) for i in range(num_classes)]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a ViT always has parameters
        return torch.device("cpu")


def describe(model: VisionTransformer) -> str:
    n = sum(p.numel() for p in model.parameters())
    return (
        f"{model.vitfab_meta.name}: embed {model.embed_dim}, depth {len(model.blocks)}, "
        f"img {model.patch_embed.img_size[0]} px, patch {model.patch_embed.patch_size[0]}, "
        f"{n / 1e6:.2f}M params"
    )


__all__ = ["BASELINE", "create_model", "describe", "model_device", "CheckpointError"]
