"""Which patches ToMe merged: each output token's group painted in the group's mean colour,
with the group borders drawn, beside the input image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.images import load_image
from ..data.transforms import eval_transform
from ..errors import VitfabError
from ..files import atomic_path
from .patch import apply, is_patched, remove
from .schedule import ScheduleSpec


def patch_groups(model, x: torch.Tensor, r: ScheduleSpec) -> tuple[np.ndarray, torch.Tensor]:
    """(group id per patch as a (gh, gw) array, logits) for one image ``x`` (1, 3, H, W).

    The model is patched with source tracing for the call and restored afterwards.
    """
    was_patched = is_patched(model)
    prev = (model._tome.schedule, model._tome.prop_attn, model._tome.trace_source, model._tome.partition) \
        if was_patched else None
    options = {"prop_attn": prev[1], "partition": prev[3]} if was_patched else {}
    apply(model, r, trace_source=True, **options)
    try:
        with torch.inference_mode():
            logits = model(x)
        source = model._tome.source
        p = model.num_prefix_tokens
        gh, gw = model.patch_embed.grid_size
        if source is None:  # nothing merged: every patch is its own group
            groups = np.arange(gh * gw)
        else:
            owner = source[0, :, p:].argmax(dim=0)  # which output token holds each input patch
            groups = owner.cpu().numpy()
        return groups.reshape(gh, gw), logits
    finally:
        if was_patched:
            apply(model, prev[0], prop_attn=prev[1], trace_source=prev[2], partition=prev[3])
        else:
            remove(model)


def render_groups(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Paint each group of patches in its mean colour and draw the borders between groups."""
    h, w = image.shape[:2]
    gh, gw = groups.shape
    ph, pw = h // gh, w // gw
    img = image[: gh * ph, : gw * pw].astype(np.float32)
    pixel_group = np.kron(groups, np.ones((ph, pw), dtype=groups.dtype))
    out = np.zeros_like(img)
    for g in np.unique(groups):
        sel = pixel_group == g
        out[sel] = img[sel].mean(axis=0)
    edge = np.zeros(pixel_group.shape, dtype=bool)
    edge[:, 1:] |= pixel_group[:, 1:] != pixel_group[:, :-1]
    edge[1:, :] |= pixel_group[1:, :] != pixel_group[:-1, :]
    out[edge] = 255.0
    return out.clip(0, 255).astype(np.uint8)


def visualize_merges(model, image_path: str | Path, r: ScheduleSpec, out: str | Path,
                     scale: int | None = None) -> dict:
    """Write ``out`` (PNG): the model's view of the image | the merged groups. Returns a summary."""
    meta = getattr(model, "vitfab_meta", None)
    if meta is None:
        raise VitfabError("visualisation needs a vitfab model (create_model / load_model)")
    pil = load_image(image_path)
    x = eval_transform(meta.preprocess)(pil)[None]
    groups, logits = patch_groups(model, x, r)
    size = meta.preprocess.img_size
    view = np.asarray(pil.convert("RGB").resize((size, size), Image.BICUBIC))
    painted = render_groups(view, groups)
    both = np.concatenate([view[: painted.shape[0], : painted.shape[1]], np.full((painted.shape[0], 4, 3), 255,
                                                                                  np.uint8), painted], axis=1)
    scale = scale or max(1, 448 // size)
    img = Image.fromarray(both).resize((both.shape[1] * scale, both.shape[0] * scale), Image.NEAREST)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    probs = logits.softmax(-1)[0]
    k = int(probs.argmax())
    return {"out": str(out), "groups": int(len(np.unique(groups))), "patches": int(groups.size),
            "predicted": meta.classes[k], "confidence": float(probs[k])}
