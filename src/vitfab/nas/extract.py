"""Subnet extraction: an architecture sliced out of a trained supernet as a standalone timm
``VisionTransformer`` (``vitfab_subnet``) whose logits equal the supernet's with that subnet set."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from ..errors import VitfabError
from ..models.arch import ArchConfig, load_arch
from ..models.checkpoint import save_checkpoint
from ..models.supernet import Supernet
from ..options import option
from .official import PUBLISHED, load_official_autoformer, published_arch
from .train import load_supernet


def extract_subnet(supernet: Supernet, arch: ArchConfig) -> VisionTransformer:
    """The subnet ``arch`` with the supernet's weights, in eval mode, with ``vitfab_meta``."""
    model = supernet.subnet_model(arch, list(supernet.vitfab_meta.classes))
    model.vitfab_meta.preprocess = copy.deepcopy(supernet.vitfab_meta.preprocess)
    return model.eval()


def extract_to(supernet: Supernet, arch: ArchConfig, out: str | Path, source: str = "") -> Path:
    """Write the extracted subnet as a vitfab checkpoint folder (loads with ``vitfab.load_model``)."""
    model = extract_subnet(supernet, arch)
    return save_checkpoint(out, model, {"arch": arch.to_dict(), "supernet": source})


@dataclass
class ExtractRequest:
    """``vitfab nas extract``: which subnet, out of which supernet, to where."""

    subnet: str | None = option(None, help="Architecture YAML (RETRAIN shape), e.g. SUPERNET/search/best.yaml, or "
                                           "a published one: AutoFormer-T, AutoFormer-S, AutoFormer-B.")
    out: str | None = option(None, help="Checkpoint folder to write (loads with vitfab.load_model).")
    supernet: str | None = option(None, help="A supernet run folder or checkpoint (vitfab nas train).")
    official_checkpoint: str | None = option(None, help="A supernet released by the AutoFormer authors.")
    space: str = option("tiny", help="With --official-checkpoint: tiny, small, base or a YAML file.")

    def arch(self) -> ArchConfig:
        name = str(self.subnet)
        if name.upper().startswith("AUTOFORMER-") and name.upper()[-1] in PUBLISHED and not Path(name).exists():
            return published_arch(name)
        return load_arch(name)

    def run(self) -> Path:
        if self.subnet is None or self.out is None:
            raise VitfabError("--subnet and --out are required")
        if (self.supernet is None) == (self.official_checkpoint is None):
            raise VitfabError("give exactly one of --supernet RUN_DIR or --official-checkpoint PATH")
        arch = self.arch()
        net = load_supernet(self.supernet) if self.supernet else load_official_autoformer(self.official_checkpoint,
                                                                                          self.space)
        return extract_to(net, arch, self.out, str(self.supernet or self.official_checkpoint))
