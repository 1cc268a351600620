"""Put a model into one precision mode: a copy of the timm model, still a ``VisionTransformer``.

- fp32: as is.
- fp16 / bf16 (``method="cast"``): weights and activations in the low dtype; normalisation
  layers (LayerNorm, RMSNorm, ...) keep fp32 weights and compute in fp32, so their variance
  cannot overflow fp16. Softmax runs inside ``scaled_dot_product_attention``, whose kernels
  accumulate in fp32. ``method="autocast"`` keeps fp32 weights and runs the forward under
  ``torch.autocast`` instead (torch's per-op list decides what stays fp32).
- int8: dynamic quantisation of every ``nn.Linear`` (int8 weights, activations quantised per
  batch at run time), CPU only.
The returned model takes fp32 input and returns fp32 logits in every mode, so callers never
cast; ``model.vitfab_precision`` names its mode.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from ..runtime import autocast
from .modes import Precision, PrecisionError, check_supported

CAST_METHODS = ("cast", "autocast")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _to_float32_input(module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _output_to(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype) if torch.is_tensor(output) else output

    return hook


def _input_to(dtype: torch.dtype):
    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    return hook


def _autocast_forward(forward, device: torch.device, amp: str, *args, **kwargs):
    with autocast(device, amp):  # the same autocast as training and evaluation use
        return forward(*args, **kwargs)


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of the Linear layers through ``torch.ao.quantization.quantize_dynamic``
    (fbgemm/x86 kernels; 2.7x fp32 on this project's CPU, where torchao 0.18's eager int8 path
    gave 1.2x). In place: the Linear layers of ``model`` itself are replaced."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise PrecisionError("int8 needs torch.ao.quantization, which this torch build lacks") from None
    with warnings.catch_warnings():  # torch 2.9+ flags the eager API as deprecated; it still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def prepare_model(
    model: nn.Module,
    precision: Precision | str,
    device: torch.device | str = "cpu",
    method: str = "cast",
) -> nn.Module:
    """A copy of ``model`` (in eval mode) that runs in ``precision`` on ``device``; ``model``
    itself is left as it was."""
    precision = Precision(precision)
    device = torch.device(device)
    check_supported(precision, device)
    if method not in CAST_METHODS:
        raise PrecisionError(f"unknown precision method '{method}' (choose {', '.join(CAST_METHODS)})")
    m = copy.deepcopy(model).eval().float()
    if precision is Precision.INT8:
        m = quantize_linear_int8(m.cpu())
    elif precision is not Precision.FP32:
        dtype = precision.dtype
        m = m.to(device)
        if method == "autocast":
            m.forward = functools.partial(_autocast_forward, m.forward, device, precision.value)
        else:
            m = m.to(dtype)
            for sub in m.modules():
                if _is_norm(sub):
                    sub.float()
                    sub.register_forward_pre_hook(_to_float32_input)
                    sub.register_forward_hook(_output_to(dtype))
            m.register_forward_pre_hook(_input_to(dtype))
    else:
        m = m.to(device)
    m.register_forward_hook(_output_to(torch.float32))
    m.vitfab_precision = precision.value
    m.vitfab_precision_method = method
    return m


def check_finite(logits: torch.Tensor, precision: Precision | str, what: str = "the validation batch") -> None:
    """The numerical guard: refuse a mode whose logits contain inf or NaN."""
    bad = ~torch.isfinite(logits)
    if bad.any():
        raise PrecisionError(
            f"{Precision(precision)} gives non-finite logits (inf/NaN in {int(bad.sum())} of {bad.numel()} values) "
            f"on {what}: the model overflows in this mode; use fp32 or bf16"
        )
