"""Device and mixed-precision choices shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from .errors import VitfabError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` set up (gloo on CPU, NCCL on GPUs); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
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
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n - 1)


# --------------------------------------------------------------------------- global state, restored
def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA). Callers that must not leave the process
    reseeded use :func:`seeded` or wrap their work in :func:`rng_restored`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_restored() -> Iterator[None]:
    """Whatever the block does to the global RNGs (``random``, numpy, torch), the caller's
    states come back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The block runs with every global RNG seeded by ``seed``; the caller's states are restored."""
    with rng_restored():
        seed_everything(seed)
        yield


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged), then restored."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise VitfabError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
