"""Device and mixed-precision choices shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .errors import VitfabError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside ``torchrun``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` set up (gloo on CPU, NCCL on GPUs); no-op otherwise."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world()


def barrier() -> None:
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world()[1] > 1 else 0)
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitfabError(f"--device {device} asked for, but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise VitfabError(f"unknown device '{device}' (use auto, cpu or cuda)") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on a CPU with native bf16, else off."""
    if amp not in AMP_MODES:
        raise VitfabError(f"unknown --amp '{amp}' (choose {', '.join(AMP_MODES)})")
    if amp == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise VitfabError("--amp fp16 needs a CUDA GPU; on CPU use bf16 or off")
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """DataLoader workers: none on small machines (they would compete with the model)."""
    import os

    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n - 1)
