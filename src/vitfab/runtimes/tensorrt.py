"""TensorRT (NVIDIA GPUs, where the ``tensorrt`` package is installed: ``pip install vitfab[tensorrt]``).

An engine is built from vitfab's ONNX graph for the run's input size and a batch range, fp32 or
fp16; the engine runs on torch's CUDA tensors. These machines have no TensorRT: this path runs
only where it is installed, and everything else says so in one line (``tensorrt_reason``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import VitfabError
from ..files import writing
from ..models.meta import ModelMeta

TRT_PRECISIONS = ("fp32", "fp16")
MAX_BATCH = 256


def tensorrt_reason(device: torch.device | str = "cuda") -> str | None:
    """Why TensorRT cannot run here, or None."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "TensorRT runs on NVIDIA GPUs only"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'vitfab[tensorrt]')"
    return None


def _trt():
    reason = tensorrt_reason()
    if reason:
        raise VitfabError(f"the tensorrt runtime cannot run here: {reason}")
    import tensorrt

    return tensorrt


def build_engine(onnx_path: str | Path, out: str | Path, precision: str, img_size: int) -> Path:
    """A serialized engine for batches 1..MAX_BATCH at ``img_size``; vitfab's metadata beside it."""
    import onnx

    trt = _trt()
    if precision not in TRT_PRECISIONS:
        raise VitfabError(f"tensorrt runs {' or '.join(TRT_PRECISIONS)} here, not {precision}")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise VitfabError(f"TensorRT could not parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (3, img_size, img_size)
    profile.set_shape("images", (1, *shape), (16, *shape), (MAX_BATCH, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise VitfabError(f"TensorRT could not build an engine from {onnx_path}")
    out = Path(out)
    with writing(out):
        out.write_bytes(bytes(engine))
    meta = next(e.value for e in onnx.load(str(onnx_path), load_external_data=False).metadata_props
                if e.key == "vitfab")
    with writing(out.with_suffix(".json")):
        out.with_suffix(".json").write_text(meta)
    return out


class TrtModel(torch.nn.Module):
    """A TensorRT engine: fp32 CUDA images in, fp32 logits out, ``vitfab_meta`` set."""

    def __init__(self, path: str | Path, precision: str = "fp32"):
        super().__init__()
        trt = _trt()
        self.path = Path(path)
        self.vitfab_meta = ModelMeta.from_dict(json.loads(self.path.with_suffix(".json").read_text()))
        self.num_classes = len(self.vitfab_meta.classes)
        self.vitfab_precision = precision
        self.engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(self.path.read_bytes())
        self.context = self.engine.create_execution_context()

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cuda().contiguous()
        out = torch.empty(x.shape[0], self.num_classes, device=x.device)
        self.context.set_input_shape("images", tuple(x.shape))
        self.context.set_tensor_address("images", x.data_ptr())
        self.context.set_tensor_address("logits", out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out
