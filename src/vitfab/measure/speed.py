"""The one way vitfab times models: ``measure_speed`` around the interleaved primitives of ``timing``.

Every caller (``vitfab bench``, the joint search, the sweep, precision ``auto``, the NAS latency
limit) hands over a list of :class:`Timed` -- a callable on an image batch and the batch it takes
-- and gets a :class:`Speed` per item: img/s repeats (interleaved A B C A B C on the same seeded
batch), batch-1 latencies (interleaved too, on the first image of that batch) and, where asked,
J/img. The thread count is set for the measurement and restored afterwards; the inputs come from
their own seeded generator, never from the global RNG.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from rich.progress import Progress

from ..progress import make_progress
from ..runtime import num_threads
from .energy import EnergyResult, measure_energy
from .isolated import Workers
from .timing import interleaved_latency, interleaved_throughput, median, percentiles, seeded_batch

DEFAULT_BATCH = {"cpu": 16, "cuda": 256}  # the throughput batch where none is given


def default_batch(device: torch.device | str) -> int:
    return DEFAULT_BATCH.get(torch.device(device).type, 16)


@dataclass
class Timed:
    """One thing to time: ``fn`` takes an image batch (B, channels, H, W). For timing in a worker
    process of its pool (``measure_speed(isolate=True)``): ``build``, a picklable call that makes
    ``fn`` there, and ``pool``, the runtime whose thread pool it uses."""

    fn: Callable[[torch.Tensor], Any]
    input_size: tuple[int, int]
    batch_size: int
    channels: int = 3
    build: Callable[[], Callable[[torch.Tensor], Any]] | None = None
    pool: str = "torch"


@dataclass
class Speed:
    img_per_s_runs: list[float]
    latency_ms_runs: list[float]
    threads: int
    energy: EnergyResult | None = None

    @property
    def img_per_s(self) -> float | None:
        return median(self.img_per_s_runs) if self.img_per_s_runs else None

    @property
    def latency_ms(self) -> dict[str, float] | None:
        return percentiles(self.latency_ms_runs) if self.latency_ms_runs else None

    @property
    def latency_ms_p50(self) -> float | None:
        return median(self.latency_ms_runs) if self.latency_ms_runs else None


@dataclass
class _Inputs:
    cache: dict = field(default_factory=dict)

    def get(self, item: Timed, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (item.batch_size, tuple(item.input_size), item.channels)
        if key not in self.cache:
            x = seeded_batch(item.batch_size, tuple(item.input_size), device, seed, item.channels)
            self.cache[key] = (x, x[:1].clone())
        return self.cache[key]


def measure_speed(
    items: Sequence[Timed],
    device: torch.device | str,
    repeats: int = 5,
    min_repeat_seconds: float = 1.0,
    latency_runs: int = 50,
    energy_seconds: float | None = None,
    threads: int | None = None,
    seed: int = 0,
    progress: bool | Progress = False,
    label: str = "",
    isolate: bool = False,
) -> list[Speed]:
    """Throughput (``repeats`` interleaved repeats of at least ``min_repeat_seconds``; 0: none),
    batch-1 latency (``latency_runs`` interleaved calls; 0: none) and, with ``energy_seconds``,
    J/img over a window of that length, for every item. ``progress``: show bars (or draw them
    in a live ``Progress``); ``label`` prefixes their names. ``isolate`` (CPU, items with a
    ``build``): each pool's items run in a worker process of their own (``measure.isolated``)."""
    device = torch.device(device)
    prefix = f"{label}: " if label else ""
    display = nullcontext(progress) if isinstance(progress, Progress) else make_progress(bool(progress))
    workers = Workers(items, threads, seed) if isolate and device.type == "cpu" else nullcontext()
    with workers, num_threads(threads), torch.inference_mode(), display as bar:
        if isinstance(workers, Workers):
            fns = [workers.fn(i) for i in range(len(items))]
            fns1 = [workers.fn(i, one=True) for i in range(len(items))]
        else:
            inputs = _Inputs()
            batches = [inputs.get(it, device, seed) for it in items]
            fns = [(lambda it=it, x=x: it.fn(x)) for it, (x, _) in zip(items, batches)]
            fns1 = [(lambda it=it, x1=x1: it.fn(x1)) for it, (_, x1) in zip(items, batches)]
        speeds, lats, energy = [[] for _ in items], [[] for _ in items], [None] * len(items)
        if repeats:
            t = bar.add_task(prefix + "throughput", total=repeats, info=f"{len(items)} interleaved")
            speeds = interleaved_throughput(fns, [it.batch_size for it in items], device, repeats,
                                            min_repeat_seconds, on_round=lambda: bar.advance(t))
        if latency_runs:
            t = bar.add_task(prefix + "latency (batch 1)", total=latency_runs, info="")
            lats = interleaved_latency(fns1, device, latency_runs, on_round=lambda: bar.advance(t))
        if energy_seconds:
            t = bar.add_task(prefix + "energy", total=len(items), info=f">= {energy_seconds:g} s each")
            for i, (it, fn) in enumerate(zip(items, fns)):
                energy[i] = measure_energy(fn, it.batch_size, device, min_seconds=energy_seconds)
                bar.advance(t)
        used = torch.get_num_threads()
    return [Speed(list(s), list(lt), used, e) for s, lt, e in zip(speeds, lats, energy)]
