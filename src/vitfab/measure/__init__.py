"""Measurement: params, MACs, throughput, latency, memory and energy, all measured."""

from .auto_precision import select_precision
from .counts import count_flops, count_macs, count_params
from .energy import EnergyResult, EnergyUnavailable, NvmlCounter, RaplCounter, measure_energy, open_energy_counter
from .measurement import Measurement, device_name
from .memory import peak_memory, weights_bytes
from .speed import DEFAULT_BATCH, Speed, Timed, default_batch, measure_speed, seeded_batch
from .timing import Stopwatch, interleaved_latency, interleaved_throughput, percentiles

__all__ = [
    "DEFAULT_BATCH", "EnergyResult", "EnergyUnavailable", "Measurement", "NvmlCounter", "RaplCounter", "Speed",
    "Stopwatch", "Timed", "count_flops", "count_macs", "count_params", "default_batch", "device_name",
    "interleaved_latency", "interleaved_throughput", "measure_energy", "measure_speed", "open_energy_counter",
    "peak_memory", "percentiles", "seeded_batch", "select_precision", "weights_bytes",
]
