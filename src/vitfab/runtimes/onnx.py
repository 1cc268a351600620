"""A PyTorch model as an ONNX graph: the one conversion every runtime but PyTorch starts from.

Token merging converts as ordinary tensor ops (see ``vitfab.export``); the graph has a dynamic
batch axis and vitfab's metadata (``ModelMeta`` as JSON) in its ``metadata_props``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import VitfabError
from ..files import writing

OPSET = 17


def example_input(model, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.vitfab_meta.preprocess.img_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def to_onnx(model, path: str | Path, opset: int = OPSET, metadata: dict[str, Any] | None = None) -> Path:
    """The fp32 model (ToMe included) as ONNX with a dynamic batch axis; ``metadata``: extra
    metadata_props entries (default: ``vitfab`` = the model's metadata)."""
    if opset < 17:
        raise VitfabError(f"--opset must be >= 17 (LayerNormalization), got {opset}")
    path = Path(path)
    x = example_input(model, 2)
    with warnings.catch_warnings():  # tracer notes on Python ints derived from shapes: token counts are static
        warnings.simplefilter("ignore")
        with writing(path):  # the exporter's C++ writer may not say that the disk is full
            torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    if metadata is None:
        metadata = {"vitfab": json.dumps(model.vitfab_meta.to_dict())}
    return set_onnx_metadata(path, path, metadata)


def set_onnx_metadata(src: Path, dst: Path, metadata: dict[str, str]) -> Path:
    """``src`` as ``dst`` with these metadata_props entries set (others kept)."""
    import onnx

    proto = onnx.load(str(src))
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key not in metadata]
    del proto.metadata_props[:]
    for key, value in kept + list(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with writing(dst):
        onnx.save(proto, str(dst))
    return Path(dst)
