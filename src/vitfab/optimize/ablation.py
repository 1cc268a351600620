"""The ablation the method argues from: the DeiT-B/16 baseline, each axis alone, each pair and
all three, measured in one interleaved run on the test split.

Axis settings: the chosen configuration's where it uses the axis, otherwise the axis's default
(so every row exists even where the choice leaves an axis out). Architecture rows use the chosen
subnet; rows with ToMe on the subnet use the weights fine-tuned with merging (the final stage),
rows without it the weights before that stage, unless the chosen configuration itself has no ToMe.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..evaluate.metrics import classification_metrics
from ..evaluate.runner import CachedBatches, collect_logits
from ..measure.bench import BenchConfig, BenchOptions, benchmark, deployed_for, load_fp32_model
from ..measure.measurement import Measurement
from ..precision import Precision, prepare_model
from ..progress import task
from ..report.summary import AblationRecord
from ..runtime import resolve_device
from ..runtimes import runtime_precisions
from ..tome import apply_spec

AXES = ("nas", "tome", "bits")
AXIS_NAMES = {"nas": "NAS", "tome": "ToMe", "bits": "bits", "runtime": "runtime"}


@dataclass
class AblationRow:
    name: str
    axes: tuple[str, ...]
    checkpoint: str
    tome: str | None
    precision: str
    chosen: bool = False
    kind: str = "ablation"  # baseline | ablation | reference | runtime
    runtime: str = "torch"

    def bench_config(self, batch_size: int | None) -> BenchConfig:
        return BenchConfig(checkpoint=self.checkpoint, precision=self.precision, tome_r=self.tome,
                           batch_size=batch_size, label=self.name, runtime=self.runtime)


def default_bits(device: torch.device, modes: Sequence[Precision]) -> Precision:
    """The bit-width used where the choice kept fp32: fp16 on a GPU, else bf16, else int8."""
    for p in (Precision.FP16 if device.type == "cuda" else Precision.BF16, Precision.BF16, Precision.INT8):
        if p in modes:
            return p
    return Precision.FP32


def ablation_rows(
    baseline: str,
    subnet: str,
    subnet_tome: str,
    chosen_tome: str | None,
    chosen_precision: str,
    bit_modes: Sequence[Precision],
    device: torch.device,
    default_tome: str,
    baseline_name: str = "DeiT-B/16 baseline",
    baseline_tome: str | None = None,
) -> list[AblationRow]:
    """``subnet``: the chosen subnet's weights before the final ToMe fine-tune, ``subnet_tome``:
    after it (the same folder where the choice has no ToMe). ``baseline_tome``: the schedule of the
    baseline's ToMe rows where it cannot be the chosen one (a searched schedule is one r per block
    of the subnet: the baseline then merges to the target it was searched for)."""
    tome_s = chosen_tome or default_tome
    tome_b = baseline_tome or tome_s
    bits = chosen_precision if chosen_precision != Precision.FP32.value else default_bits(device, bit_modes).value
    fp32 = Precision.FP32.value
    rows = [AblationRow(baseline_name, (), baseline, None, fp32, kind="baseline"),
            AblationRow("NAS", ("nas",), subnet, None, fp32),
            AblationRow(f"ToMe {tome_b}", ("tome",), baseline, tome_b, fp32)]
    rows += [AblationRow(p.value, ("bits",), baseline, None, p.value) for p in bit_modes if p != Precision.FP32]
    rows += [AblationRow("NAS + ToMe", ("nas", "tome"), subnet_tome, tome_s, fp32),
             AblationRow(f"NAS + {bits}", ("nas", "bits"), subnet, None, bits),
             AblationRow(f"ToMe + {bits}", ("tome", "bits"), baseline, tome_b, bits),
             AblationRow(f"NAS + ToMe + {bits}", AXES, subnet_tome, tome_s, bits)]
    chosen_axes = ("nas",) + (("tome",) if chosen_tome else ()) + (("bits",) if chosen_precision != fp32 else ())
    for row in rows:
        row.chosen = row.axes == chosen_axes
    return rows


def runtime_rows(baseline: str, chosen_row: AblationRow, runtime: str, runtimes: Sequence[str],
                 device: torch.device, baseline_name: str = "DeiT-B/16 baseline") -> list[AblationRow]:
    """"+ runtime": the chosen configuration in its runtime (where that is not PyTorch; it then is
    the chosen row), and the baseline in each of ``runtimes`` but PyTorch at fp32 and at the chosen
    precision where that runtime runs it -- so the speedup against a baseline deployed well can be
    read (with a tight budget the main job passes the chosen runtime alone)."""
    rows = []
    if runtime != "torch":
        chosen_row.chosen = False
        rows.append(AblationRow(f"{chosen_row.name} + {runtime}", chosen_row.axes + ("runtime",),
                                chosen_row.checkpoint, chosen_row.tome, chosen_row.precision, True, "runtime", runtime))
    for rt in runtimes:
        if rt == "torch":
            continue
        for p in dict.fromkeys(("fp32", chosen_row.precision)):
            if p in runtime_precisions(rt, device):
                rows.append(AblationRow(f"{baseline_name} {p} + {rt}", ("runtime",), baseline, None, p,
                                        kind="runtime", runtime=rt))
    return rows


def row_metrics(row: AblationRow, batches: CachedBatches, device: torch.device, good_class: str | None,
                progress: bool = False, options: BenchOptions | None = None, cache: dict | None = None) -> dict[str, Any]:
    """Test-split metrics of one row, run as measured (ToMe applied, precision prepared; in its
    runtime, converted into ``cache``'s folder, where that is not PyTorch)."""
    cfg = row.bench_config(None)
    base = apply_spec(load_fp32_model(cfg), row.tome)
    if row.runtime == "torch":
        model = prepare_model(base, row.precision, device)
    else:
        model = deployed_for(cfg, base, row.precision, options or BenchOptions(), cache).build(device)
    logits, targets = collect_logits(model, batches, device, progress=progress, description=row.name)
    return classification_metrics(logits, targets, base.vitfab_meta.classes, good_class)


def measure_ablation(
    rows: Sequence[AblationRow],
    test: CachedBatches,
    options: BenchOptions,
    good_class: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    calibration: Sequence[np.ndarray] | None = None,
) -> list[AblationRecord]:
    """Every row: test metrics, then speed, latency, memory and energy of all rows interleaved
    (each runtime in a timing worker of its own where rows use several; int8 of a static runtime
    calibrated on ``calibration``)."""
    device = resolve_device(options.device)
    metrics = []
    with tempfile.TemporaryDirectory(prefix="vitfab-ablation-") as work:
        cache = {"workdir": work, "calibration": calibration}
        with task("ablation: test split", total=len(rows), enabled=progress) as advance:
            for row in rows:
                metrics.append(row_metrics(row, test, device, good_class, options=options, cache=cache))
                advance(1)
        ms = benchmark([r.bench_config(batch_size) for r in rows], options, progress=progress, cache=cache)
    return [ablation_record(r, m, mt, ms[0]) for r, m, mt in zip(rows, ms, metrics)]


NO_GOOD = "no good/normal class in this data set (--good-class names one)"


def ablation_record(row: AblationRow, m: Measurement, metrics: dict[str, Any], base: Measurement) -> AblationRecord:
    """One row as reported: the test metrics and the measurement."""
    return AblationRecord(
        name=row.name, axes=list(row.axes), chosen=row.chosen, kind=row.kind, checkpoint=row.checkpoint, tome=row.tome,
        precision=row.precision, runtime=row.runtime, accuracy=metrics["top1"], macro_f1=metrics["macro_f1"],
        escape_rate=metrics.get("escape_rate"), overkill_rate=metrics.get("overkill_rate"),
        params=m.params, gmacs=round(m.gmacs, 4), img_per_s=round(m.img_per_s, 2),
        speedup=round(m.img_per_s / base.img_per_s, 3) if base.img_per_s else None,
        latency_ms_p50=round(m.latency_ms["p50"], 3), latency_ms_p99=round(m.latency_ms["p99"], 3),
        joules_per_img=m.joules_per_img, energy_note=m.energy.reason, peak_memory_mb=m.peak_memory_mb,
        batch_size=m.batch_size, img_size=m.img_size, r_per_layer=(m.tome or {}).get("r_per_layer"),
        img_per_s_runs=m.img_per_s_runs, confusion_matrix=metrics["confusion_matrix"], classes=metrics["classes"],
        escape_note=None if "escape_rate" in metrics else NO_GOOD, balanced_accuracy=metrics["balanced_accuracy"],
    )
