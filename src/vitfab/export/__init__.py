"""Deployment: the chosen model as safetensors, TorchScript and ONNX (ToMe inside), checked in
ONNX Runtime; loading any of them back in PyTorch or ONNX Runtime."""

from .deploy import FORMATS, export_deploy, export_onnx, export_torchscript, ort_session, parity
from .runtime import RUNTIMES, OrtModel, load_deployed, onnx_meta

__all__ = ["FORMATS", "RUNTIMES", "OrtModel", "export_deploy", "export_onnx", "export_torchscript", "load_deployed",
           "onnx_meta", "ort_session", "parity"]
