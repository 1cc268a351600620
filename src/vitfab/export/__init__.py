"""Deployment: the chosen model as safetensors, TorchScript and ONNX (ToMe inside), checked against
PyTorch in ONNX Runtime. Loading the artifacts back is ``vitfab.runtimes``' job."""

from .deploy import FORMATS, export_deploy, export_images, export_onnx, export_torchscript, parity

__all__ = ["FORMATS", "export_deploy", "export_images", "export_onnx", "export_torchscript", "parity"]
