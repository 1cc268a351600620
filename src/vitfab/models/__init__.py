"""Models: timm Vision Transformers by name, local weights, vitfab checkpoints, the AutoFormer supernet."""

from .checkpoint import load_checkpoint, model_from_meta, read_meta, save_checkpoint
from .factory import BASELINE, create_model, describe
from .meta import ModelMeta
from .subnet import subnet_kwargs  # importing it registers vitfab_subnet with timm

__all__ = ["BASELINE", "ModelMeta", "create_model", "describe", "load_checkpoint", "model_from_meta", "read_meta",
           "save_checkpoint", "subnet_kwargs"]
