"""Peak memory of a forward pass: CUDA's max-allocated counter, or the growth of the process's
peak resident set (VmHWM) on CPUs."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import torch
from torch import nn

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that a forward pass
    that reuses memory freed by an earlier one still shows up as RSS growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: growth may read low after earlier passes
        pass


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    _release_free_heap()
    try:
        PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def weights_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, packed int8 weights included."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for mod in model.modules():  # dynamically quantised Linear keeps its weight in a packed param
        packed = getattr(mod, "_packed_params", None)
        if packed is not None and hasattr(mod, "weight") and callable(mod.weight):
            for t in (mod.weight(), mod.bias() if callable(getattr(mod, "bias", None)) else None):
                if t is not None:
                    total += t.numel() * t.element_size()
    return total


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """(MiB, what was measured) for one call of ``fn``.

    Both count what the call adds on top of what is already there (activations and workspace;
    the weights are reported apart, see ``weights_bytes``), so models loaded side by side do not
    count in each other's figure. CUDA: ``max_memory_allocated`` during the call minus the
    allocation before it. CPU: growth of the peak resident set over the resident set before the
    call. ``None`` with the reason where the OS gives no peak counter.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda max allocated growth"
    if not _reset_peak_rss():
        return None, "unavailable: /proc/self/clear_refs cannot reset the peak RSS here"
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None, "unavailable: /proc/self/status has no VmRSS/VmHWM"
    return max(peak - before, 0) / 1024, "cpu peak RSS growth"
