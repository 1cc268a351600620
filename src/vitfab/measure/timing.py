"""Synchronised wall-clock timing: throughput (img/s) and batch-1 latency percentiles.

Shared machines are noisy, so everything here is built for interleaving: several callables are
timed in rounds (A B C A B C ...), each repeat is long enough to average out scheduler noise,
and medians are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch


def seeded_batch(batch_size: int, input_size: tuple[int, int], device: torch.device | str, seed: int = 0,
                 channels: int = 3) -> torch.Tensor:
    """A standard-normal image batch drawn from its own generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, channels, *input_size, generator=gen).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Times a call including all the device work it queued (CUDA events on GPUs)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def __call__(self, fn: Callable[[], object], iters: int = 1) -> float:
        """Seconds for ``iters`` calls of ``fn``."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # events on this device's stream, not the current one
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                synchronize(self.device)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
            return start.elapsed_time(end) / 1000.0
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(self.device)
        return time.perf_counter() - t0


def calibrate(fn: Callable[[], object], stopwatch: Stopwatch, min_seconds: float, warmup: int = 2) -> int:
    """Run ``warmup`` calls, then return how many calls make a repeat of at least ``min_seconds``."""
    for _ in range(max(warmup, 1)):
        fn()
    one = max(stopwatch(fn), 1e-6)
    return max(1, int(np.ceil(min_seconds / one)))


def interleaved_throughput(
    fns: Sequence[Callable[[], object]],
    batch_sizes: Sequence[int],
    device: torch.device,
    repeats: int = 5,
    min_repeat_seconds: float = 1.0,
    warmup: int = 2,
    on_round: Callable[[], None] | None = None,
) -> list[list[float]]:
    """img/s of each callable, ``repeats`` values each, measured in rounds A B C A B C ..."""
    sw = Stopwatch(device)
    iters = [calibrate(fn, sw, min_repeat_seconds, warmup) for fn in fns]
    results: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            seconds = sw(fn, iters[i])
            results[i].append(batch_sizes[i] * iters[i] / seconds)
        if on_round:
            on_round()
    return results


def interleaved_latency(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    runs: int = 50,
    warmup: int = 3,
    on_round: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Milliseconds per call of each callable (call it with batch 1), ``runs`` samples each."""
    sw = Stopwatch(device)
    for fn in fns:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            samples[i].append(sw(fn) * 1000.0)
        if on_round:
            on_round()
    return samples


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    arr = np.asarray(samples, dtype=float)
    return {f"p{int(q)}": float(np.percentile(arr, q)) for q in qs}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
