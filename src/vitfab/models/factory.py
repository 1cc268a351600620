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
    candidates = timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise VitfabError(f"unknown timm model '{name}'{hint}")


def _build(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm's model; a convnet (no ``img_size`` argument: it takes any size) is built without it."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        if "img_size" in str(exc) and "patch_size" not in kwargs:  # a CNN: the size is the data's, not the model's
            return _build(name, pretrained, {k: v for k, v in kwargs.items() if k != "img_size"})
        if "patch_size" in str(exc):
            raise VitfabError(f"{name} has no patches: --patch-size applies to ViTs") from None
        raise VitfabError(f"cannot build {name} with {kwargs}: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise CheckpointError(
                f"could not fetch pretrained weights for {name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); offline? "
                "pass a local file with --weights PATH"
            ) from None
        raise VitfabError(f"cannot build {name} with {kwargs}: {exc}") from None


def is_vit(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def create_model(
    name: str = BASELINE,
    num_classes: int | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    classes: list[str] | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Build a timm classifier by name: a ``VisionTransformer`` (DeiT, ViT, vitfab's subnets), or
    any other timm model, e.g. the convnets the main job trains as references.

    ``img_size`` / ``patch_size`` override a ViT's architecture for small-scale runs (position
    and patch embeddings of loaded weights are resized to fit); a convnet takes any input size,
    and ``img_size`` only sets the size it is fed. Other keyword arguments go to timm
    (``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``, ...). ``pretrained`` takes timm's
    hub weights (needs the network); ``weights`` a local ``.safetensors`` or ``.pth/.pt`` file.
    With a different class count the classifier head is re-initialised. The returned model
    carries ``model.vitfab_meta`` (a :class:`ModelMeta`).
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
    model = _build(name, pretrained, kwargs)
    if not is_vit(model):
        kwargs.pop("img_size", None)
    if weights:
        load_weights(model, weights)
    cfg = model.pretrained_cfg or {}
    size = int(model.patch_embed.img_size[0]) if is_vit(model) else int(img_size or cfg.get("input_size", (3, 224))[-1])
    pre = Preprocess(
        img_size=size,
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


def describe(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    size = model.vitfab_meta.preprocess.img_size
    if not is_vit(model):
        return f"{model.vitfab_meta.name}: {type(model).__name__}, img {size} px, {n / 1e6:.2f}M params"
    return (
        f"{model.vitfab_meta.name}: embed {model.embed_dim}, depth {len(model.blocks)}, "
        f"img {size} px, patch {model.patch_embed.patch_size[0]}, {n / 1e6:.2f}M params"
    )


__all__ = ["BASELINE", "create_model", "describe", "is_vit", "model_device", "CheckpointError"]
