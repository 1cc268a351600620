"""vitfab: the fastest, lowest-energy Vision Transformer that meets an accuracy requirement.

Public entry points:

- :func:`create_model` — any timm ``VisionTransformer`` by name, resized, with local weights;
- :func:`load_model` — a model saved by vitfab (run folder, checkpoint folder or file), in
  eval mode, with ``model.vitfab_meta`` (name, timm kwargs, classes, preprocessing), its
  recorded ToMe schedule re-applied and, with ``precision="recorded"``, in its chosen bit-width.
"""

from .errors import VitfabError
from .models import create_model
from .runtimes import load_model

__version__ = "0.1.0"
__all__ = ["VitfabError", "__version__", "create_model", "load_model"]
