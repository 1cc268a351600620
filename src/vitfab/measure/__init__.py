"""Measurement: params, MACs, throughput, latency, memory and energy, all measured."""

from .counts import count_flops, count_macs, count_params
from .energy import EnergyResult, EnergyUnavailable, NvmlCounter, RaplCounter, measure_energy, open_energy_counter
from .measurement import Measurement, device_name
from .memory import peak_memory, weights_bytes
from .timing import Stopwatch, interleaved_latency, interleaved_throughput, percentiles

__all__ = [
    "EnergyResult", "EnergyUnavailable", "Measurement", "NvmlCounter", "RaplCounter", "Stopwatch",
    "count_flops", "count_macs", "count_params", "device_name", "interleaved_latency", "interleaved_throughput",
    "measure_energy", "open_energy_counter", "peak_memory", "percentiles", "weights_bytes",
]
