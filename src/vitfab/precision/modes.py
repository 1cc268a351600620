"""The bit-width axis: which numeric modes exist and where each one can run."""

from __future__ import annotations

import enum

import torch

from ..errors import VitfabError
from ..runtime import cpu_has_native_bf16


class PrecisionError(VitfabError):
    """A precision mode that cannot run here, or that breaks the model's numbers."""


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # dynamic quantisation of the Linear layers (CPU)

    def __str__(self) -> str:
        return self.value

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of weights and activations (int8 keeps fp32 activations)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.value, torch.float32)


AUTO = "auto"
PRECISION_CHOICES = tuple(p.value for p in Precision) + (AUTO,)


def parse_precision(value: str | Precision, allow_auto: bool = True) -> Precision | str:
    """``Precision`` from its name; ``"auto"`` stays the string ``"auto"`` where allowed."""
    if isinstance(value, Precision):
        return value
    name = str(value).strip().lower()
    if name == AUTO and allow_auto:
        return AUTO
    try:
        return Precision(name)
    except ValueError:
        choices = PRECISION_CHOICES if allow_auto else PRECISION_CHOICES[:-1]
        raise PrecisionError(f"unknown precision '{value}' (choose {', '.join(choices)})") from None


def int8_engine_available() -> bool:
    return any(e != "none" for e in torch.backends.quantized.supported_engines)


def _cuda_native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def unsupported_reason(precision: Precision, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device``, or None where it can.

    Slow is not unsupported: fp16 on a CPU runs (emulated, slowly) and ``auto`` measures it.
    """
    precision = Precision(precision)
    if precision is Precision.INT8:
        if device.type != "cpu":
            return "int8 is dynamic quantisation for CPUs; on CUDA use fp16 or bf16"
        if not int8_engine_available():
            return "this torch build has no quantized CPU engine (fbgemm/x86/onednn) for int8"
    if precision is Precision.BF16 and device.type == "cuda" and not _cuda_native_bf16(device):
        return f"{torch.cuda.get_device_name(device)} has no native bf16 (before Ampere)"
    return None


def check_supported(precision: Precision, device: torch.device) -> None:
    reason = unsupported_reason(precision, device)
    if reason:
        raise PrecisionError(reason)


def with_reference(modes) -> list[Precision]:
    """``modes`` with fp32 in front where it is missing: every comparison of modes is against fp32."""
    modes = [Precision(m) for m in modes]
    return modes if Precision.FP32 in modes else [Precision.FP32, *modes]


def candidate_precisions(device: torch.device) -> list[Precision]:
    """Every mode that runs on ``device``, fp32 first (the reference)."""
    return [p for p in Precision if unsupported_reason(p, device) is None]


def useful_precisions(device: torch.device) -> list[Precision]:
    """The modes worth measuring in a search on ``device``: every runnable one, except fp16 on a
    CPU without native bf16/fp16 arithmetic (emulated; measured at 0.19x fp32 on an AVX512-BF16
    EPYC, see the README) -- ``--precisions`` asks for it explicitly."""
    modes = candidate_precisions(device)
    if device.type == "cpu":
        modes = [p for p in modes if p is not Precision.FP16]
        if not cpu_has_native_bf16():
            modes = [p for p in modes if p is not Precision.BF16]
    return modes
