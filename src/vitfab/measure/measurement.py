"""``Measurement``: every number a vitfab report shows is one of these fields."""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .energy import EnergyResult


@dataclass
class Measurement:
    label: str
    model: str
    precision: str
    device: str
    device_name: str
    batch_size: int
    img_size: int
    threads: int
    params: int
    macs: int  # per image, counted on a real forward pass
    img_per_s: float  # median of the repeats
    img_per_s_runs: list[float]
    latency_ms: dict[str, float]  # batch 1: p50, p90, p99
    peak_memory_mb: float | None
    memory_kind: str
    weights_mb: float
    energy: EnergyResult
    tome: dict[str, Any] | None = None  # schedule, r per layer, prop_attn; None: no merging
    accuracy: float | None = None  # top-1 on labelled data, where given
    accuracy_on: str | None = None
    torch_version: str = field(default_factory=lambda: torch.__version__)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def joules_per_img(self) -> float | None:
        return self.energy.joules_per_img

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("energy")
        d.pop("latency_ms")
        d.update(gmacs=round(self.gmacs, 4), **{f"latency_ms_{k}": v for k, v in self.latency_ms.items()},
                 **self.energy.to_dict())
        return d


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()
