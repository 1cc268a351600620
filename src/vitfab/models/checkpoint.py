"""vitfab checkpoints: ``model.safetensors`` (metadata embedded) + ``meta.json`` in one folder.

``load_model`` takes a run folder (its ``best`` checkpoint), a checkpoint folder or a single
``.safetensors`` file written by vitfab, rebuilds the timm model and returns it in eval mode
with ``model.vitfab_meta`` (a :class:`ModelMeta`: model name and kwargs, classes, preprocessing).
A model saved with token merging on comes back patched with the same per-layer schedule.
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
from ..files import atomic_dir, existing_dir, write_json_atomic
from .meta import FORMAT, ModelMeta

WEIGHTS_FILE, META_FILE, STATE_FILE = "model.safetensors", "meta.json", "train_state.pt"


def save_checkpoint(
    folder: str | Path,
    model: VisionTransformer,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights, metadata and (optionally) the training state into ``folder`` atomically."""
    with atomic_dir(folder) as tmp:
        write_checkpoint(tmp, model, extra, train_state)
    return Path(folder)


def write_checkpoint(
    folder: Path,
    model: VisionTransformer,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint files in an existing (temporary) folder; returns the metadata written."""
    from ..tome import tome_info

    meta: ModelMeta = model.vitfab_meta
    meta_dict = meta.to_dict() | dict(extra or {})
    meta_dict.pop("tome", None)
    tome = tome_info(model)  # the merge schedule travels with the weights
    if tome is not None:
        meta_dict["tome"] = tome
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"vitfab": json.dumps(meta_dict)})
    write_json_atomic(folder / META_FILE, meta_dict)
    if train_state is not None:
        torch.save(train_state, folder / STATE_FILE)
    return meta_dict


def resolve_weights(path: Path) -> Path:
    """A run folder, checkpoint folder or file -> the ``model.safetensors`` to read."""
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            found = existing_dir(path / "checkpoints" / "best") or existing_dir(path / "checkpoints" / "last")
            if found is None:
                raise CheckpointError(f"run folder {path} has no checkpoint yet")
            path = found
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE
        raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}: not a vitfab checkpoint or run folder")
    found = existing_dir(path)  # a checkpoint folder caught mid-swap
    if found is not None:
        return resolve_weights(found)
    raise CheckpointError(f"checkpoint not found: {path}")


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


def apply_recorded_tome(model: VisionTransformer, meta: ModelMeta) -> VisionTransformer:
    """Re-apply the ToMe schedule saved with a model (nothing where none was saved)."""
    tome = meta.extra.get("tome")
    if tome:
        from ..tome import apply

        apply(model, tome.get("spec", list(tome["r_per_layer"])), prop_attn=tome.get("prop_attn", True))
    return model


def model_from_meta(meta: ModelMeta, weights: str | Path | None = None) -> VisionTransformer:
    """The model ``meta`` describes (eval mode, ``vitfab_meta`` set, saved ToMe schedule applied),
    with ``weights``, or random weights where None (enough to count params and MACs)."""
    from .factory import create_model

    kwargs = {k: v for k, v in meta.kwargs.items() if k != "num_classes"}
    model = create_model(meta.name, classes=meta.classes, weights=weights, **kwargs)
    model.vitfab_meta = meta
    return apply_recorded_tome(model, meta).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", precision: str | None = None) -> VisionTransformer:
    """Rebuild a model saved by vitfab; eval mode, ``model.vitfab_meta`` set, ToMe re-applied.

    ``precision``: None keeps fp32 weights; a mode (fp16, bf16, int8) prepares the model to run
    in it; ``"recorded"`` uses the mode saved with the checkpoint (``vitfab run``'s choice), or
    fp32 where none was saved or the recorded mode cannot run on ``device`` (with a note).
    """
    weights = resolve_weights(Path(path))
    meta = read_meta(weights)
    model = model_from_meta(meta, weights).to(device)
    if precision is None:
        return model
    from ..precision import prepare_model, unsupported_reason

    mode = meta.extra.get("precision", "fp32") if precision == "recorded" else precision
    reason = unsupported_reason(mode, torch.device(device))
    if reason and precision == "recorded":
        from ..progress import console

        console.print(f"note: {path} was chosen to run in {mode}, which cannot run here ({reason}); using fp32")
        return model
    return model if mode == "fp32" else prepare_model(model, mode, device)
