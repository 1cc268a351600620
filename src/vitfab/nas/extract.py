"""Subnet extraction: an architecture sliced out of a trained supernet as a standalone timm
``VisionTransformer`` (``vitfab_subnet``) whose logits equal the supernet's with that subnet set."""

from __future__ import annotations

import copy
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from ..models.arch import ArchConfig
from ..models.checkpoint import save_checkpoint
from ..models.factory import create_model
from ..models.supernet import Supernet


def extract_subnet(supernet: Supernet, arch: ArchConfig) -> VisionTransformer:
    """The subnet ``arch`` with the supernet's weights, in eval mode, with ``vitfab_meta``."""
    space = supernet.space
    model = create_model("vitfab_subnet", classes=list(supernet.vitfab_meta.classes), img_size=space.img_size,
                         patch_size=space.patch_size, **supernet.subnet_kwargs(arch))
    model.load_state_dict(supernet.subnet_state_dict(arch))
    model.vitfab_meta.preprocess = copy.deepcopy(supernet.vitfab_meta.preprocess)
    return model.eval()


def extract_to(supernet: Supernet, arch: ArchConfig, out: str | Path, source: str = "") -> Path:
    """Write the extracted subnet as a vitfab checkpoint folder (loads with ``vitfab.load_model``)."""
    model = extract_subnet(supernet, arch)
    return save_checkpoint(out, model, {"arch": arch.to_dict(), "supernet": source})
