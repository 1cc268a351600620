"""Reading weight files safely and fitting a state dict to a (possibly resized) timm ViT."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..errors import CheckpointError

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or ``.pth/.pt/.bin`` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects that could run code, not only "
            f"tensors ({first[:160]}). Re-save it as a plain state dict or .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {exc}") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of the classifier(s): ``head.``/``head_dist.`` for ViTs, the model's
    own (``fc.`` for a ResNet, ``classifier.`` ...) for other timm models."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("head.", "head_dist.")


def fit_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Resize a ViT's position and patch embeddings to ``model`` (timm's rules) and drop a
    classifier head whose class count differs, so that the model keeps its freshly initialised head."""
    sd = checkpoint_filter_fn(dict(state_dict), model) if isinstance(model, VisionTransformer) else dict(state_dict)
    own, heads = model.state_dict(), head_prefixes(model)
    for key in list(sd):
        if key.startswith(heads) and key in own and sd[key].shape != own[key].shape:
            del sd[key]
    return sd


def load_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a weight file into ``model``; returns the keys kept at their initial values
    (a re-initialised head). Any other mismatch is an error."""
    sd = fit_state_dict(read_state_dict(path), model)
    own = model.state_dict()
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit this model: shape mismatch at {', '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''} (check --model, --img-size, --patch-size)"
        )
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefixes(model))]
    if missing or result.unexpected_keys:
        detail = missing[:3] or result.unexpected_keys[:3]
        raise CheckpointError(f"{path} does not fit this model: keys {', '.join(detail)} do not match")
    return list(result.missing_keys)
