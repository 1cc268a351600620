"""vitfab checkpoints: ``model.safetensors`` (metadata embedded) + ``meta.json`` in one folder.

``load_checkpoint`` takes a run folder (its ``best`` checkpoint), a checkpoint folder or a single
``.safetensors`` file written by vitfab, rebuilds the timm model with its weights and returns it
in eval mode with ``model.vitfab_meta`` (a :class:`ModelMeta`: model name and kwargs, classes,
preprocessing, and what else was recorded, e.g. a ToMe schedule and a precision mode). It does
not apply what was recorded: ``vitfab.load_model`` (``runtimes.pytorch``) does that, above the
layers that know token merging and precision modes.

A model may add to its own metadata when saved: ``model.vitfab_checkpoint_meta()``, where it
exists, returns fields for ``meta.json`` (a ToMe-patched model records its schedule that way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError
from ..files import atomic_dir, write_json_atomic, writing
from ..rundir import META_FILE, TRAIN_STATE_FILE, WEIGHTS_FILE, resolve_weights
from .factory import create_model
from .meta import FORMAT, ModelMeta

STATE_FILE = TRAIN_STATE_FILE


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights, metadata and (optionally) the training state into ``folder`` atomically."""
    with atomic_dir(folder) as tmp:
        write_checkpoint(tmp, model, extra, train_state)
    return Path(folder)


def write_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint files in an existing (temporary) folder; returns the metadata written."""
    meta: ModelMeta = model.vitfab_meta
    meta_dict = meta.to_dict() | dict(extra or {})
    meta_dict.pop("tome", None)  # what the model is now decides, not what it was loaded with
    own = getattr(model, "vitfab_checkpoint_meta", None)
    if own is not None:
        meta_dict |= own()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with writing(folder / WEIGHTS_FILE, nbytes=sum(t.numel() * t.element_size() for t in tensors.values())):
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"vitfab": json.dumps(meta_dict)})
    write_json_atomic(folder / META_FILE, meta_dict)
    if train_state is not None:
        with writing(folder / STATE_FILE):  # torch.save's own error does not say the disk is full
            torch.save(train_state, folder / STATE_FILE)
    return meta_dict


def copy_with_meta(src: str | Path, dst: str | Path, meta: dict[str, Any]) -> None:
    """``src``'s weights file as ``dst`` with ``meta`` as its embedded metadata (the tensors bit for bit)."""
    from safetensors.torch import load_file

    save_file(load_file(str(src)), str(dst), metadata={"vitfab": json.dumps(meta)})


def read_meta(path: str | Path) -> ModelMeta:
    weights = resolve_weights(Path(path))
    if weights.suffix != ".safetensors":
        raise CheckpointError(
            f"{weights} is not a vitfab checkpoint (.safetensors with metadata); "
            "to use a plain weights file, pass --model NAME --weights PATH"
        )
    try:
        with safe_open(str(weights), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("vitfab")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    if raw is None:
        raise CheckpointError(
            f"{weights} has no vitfab metadata; to use plain weights pass --model NAME --weights PATH"
        )
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: unsupported checkpoint format {meta.get('format')!r}")
    return ModelMeta.from_dict(meta)


def model_from_meta(meta: ModelMeta, weights: str | Path | None = None) -> VisionTransformer:
    """A new model as ``meta`` describes it (eval mode, ``vitfab_meta`` set), with ``weights``,
    or random weights where None (enough to count params and MACs). Nothing recorded is applied."""
    kwargs = {k: v for k, v in meta.kwargs.items() if k != "num_classes"}
    model = create_model(meta.name, classes=meta.classes, weights=weights, **kwargs)
    model.vitfab_meta = meta
    return model.eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """A model saved by vitfab with its weights, in eval mode, as a plain timm model (see the
    module doc: recorded ToMe schedules and precision modes are not applied here)."""
    weights = resolve_weights(Path(path))
    return model_from_meta(read_meta(weights), weights).to(device)
