"""Energy per image from hardware counters, never estimated.

- NVIDIA GPUs: NVML's total-energy counter (millijoules since the driver loaded; Volta and
  newer) through nvidia-ml-py (``import pynvml``).
- Linux CPUs: RAPL package counters under /sys/class/powercap (microjoules, wrapping at
  ``max_energy_range_uj``). They count the whole socket, whatever else runs on it.
Where neither can be read, the result says ``unavailable`` and why. The window is stretched to
at least a few seconds because the counters update in steps of ~1-100 ms.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

POWERCAP = Path("/sys/class/powercap")
MIN_WINDOW_SECONDS = 3.0
_PACKAGE = re.compile(r"^intel-rapl:\d+$")  # top-level (package) domains; subdomains have a 2nd colon


class EnergyUnavailable(Exception):
    """No counter to read; the message is the reason shown in place of a number."""


@dataclass
class EnergyResult:
    joules_per_img: float | None
    source: str  # "nvml", "rapl" or "unavailable"
    reason: str | None = None  # why unavailable
    joules: float | None = None
    seconds: float | None = None
    images: int | None = None

    @property
    def watts(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {"joules_per_img": self.joules_per_img, "energy_source": self.source, "energy_note": self.reason,
                "energy_window_s": self.seconds, "avg_watts": self.watts}


def counter_delta(before: int, after: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after ``max_range``; assumes at most one wrap."""
    if after >= before:
        return after - before
    return after + (max_range - before) + 1


class RaplCounter:
    """Sum of the RAPL package domains, in joules."""

    source = "rapl"

    def __init__(self, root: str | Path = POWERCAP):
        root = Path(root)
        if not root.is_dir():
            raise EnergyUnavailable(f"no RAPL counters: {root} does not exist (no powercap driver, or not Linux)")
        self.domains = sorted(d for d in root.iterdir() if _PACKAGE.match(d.name) and (d / "energy_uj").exists())
        if not self.domains:
            raise EnergyUnavailable(f"no RAPL package domain with energy_uj under {root}")
        self.max_range = []
        for d in self.domains:
            try:
                self.max_range.append(int((d / "max_energy_range_uj").read_text()))
                int((d / "energy_uj").read_text())
            except PermissionError:
                raise EnergyUnavailable(
                    f"RAPL counters not readable ({d / 'energy_uj'}: permission denied; root only on "
                    "Linux >= 5.10, grant read access to measure CPU energy)") from None
            except (OSError, ValueError) as exc:
                raise EnergyUnavailable(f"RAPL counter unreadable: {exc}") from None
        self.name = ", ".join((d / "name").read_text().strip() if (d / "name").exists() else d.name
                              for d in self.domains)
        self._last = self._raw()
        self._total_uj = 0

    def _raw(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def read(self) -> float:
        """Joules since this object was made; call often enough that no domain wraps twice."""
        now = self._raw()
        for i, (b, a) in enumerate(zip(self._last, now)):
            self._total_uj += counter_delta(b, a, self.max_range[i])
        self._last = now
        return self._total_uj / 1e6


class NvmlCounter:
    """NVML's total-energy counter of one GPU, in joules."""

    source = "nvml"

    def __init__(self, index: int = 0, nvml: Any = None):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise EnergyUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        self.nvml = nvml
        try:
            nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self._start = nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except nvml.NVMLError as exc:
            raise EnergyUnavailable(f"NVML total-energy counter unavailable on GPU {index}: {exc}") from None

    def read(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._start) / 1000.0

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def open_energy_counter(device: torch.device, powercap: str | Path | None = None, nvml: Any = None):
    """The counter for ``device``; raises ``EnergyUnavailable`` with the reason."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)  # CUDA order != NVML's PCI order
        if to_nvml is not None and torch.cuda.is_available():
            index = to_nvml(index)
        return NvmlCounter(index, nvml)
    if device.type == "cpu":
        return RaplCounter(POWERCAP if powercap is None else powercap)
    raise EnergyUnavailable(f"no energy counter for device type {device.type}")


def measure_energy(
    fn: Callable[[], object],
    images_per_call: int,
    device: torch.device,
    counter=None,
    min_seconds: float = MIN_WINDOW_SECONDS,
    warmup: int = 1,
) -> EnergyResult:
    """Joules per image over a window of at least ``min_seconds`` of back-to-back calls."""
    device = torch.device(device)
    if counter is None:
        try:
            counter = open_energy_counter(device)
        except EnergyUnavailable as exc:
            return EnergyResult(None, "unavailable", str(exc))
        try:
            return measure_energy(fn, images_per_call, device, counter, min_seconds, warmup)
        finally:
            if hasattr(counter, "close"):
                counter.close()
    for _ in range(warmup):
        fn()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    e0, t0, calls = counter.read(), time.perf_counter(), 0
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - t0
        joules = counter.read() - e0  # read every call: RAPL must not wrap twice unseen
        if elapsed >= min_seconds:
            break
    images = calls * images_per_call
    if joules <= 0:
        return EnergyResult(None, "unavailable", f"{counter.source} counter did not advance in {elapsed:.1f} s")
    return EnergyResult(joules / images, counter.source, None, joules, elapsed, images)
