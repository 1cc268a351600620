"""vitfab.measure: counts against the published figures, timing, memory, energy readers."""

import sys
import types
from pathlib import Path

import pytest
import timm
import torch

from vitfab.measure import (
    EnergyUnavailable,
    NvmlCounter,
    RaplCounter,
    count_macs,
    count_params,
    interleaved_latency,
    interleaved_throughput,
    measure_energy,
    open_energy_counter,
    peak_memory,
    percentiles,
    weights_bytes,
)
from vitfab.measure.counts import attention_flops
from vitfab.measure.energy import counter_delta
from vitfab.precision import prepare_model

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- params and MACs
@pytest.mark.parametrize("name,gmacs,mparams", [
    ("deit_base_patch16_224", 17.6, 86.6),
    ("deit_small_patch16_224", 4.6, 22.1),
    ("deit_tiny_patch16_224", 1.3, 5.7),
])
def test_published_macs_and_params(name, gmacs, mparams):
    model = timm.create_model(name).eval()
    macs = count_macs(model) / 1e9
    assert round(count_params(model) / 1e6, 1) == mparams
    assert round(macs, 1) == gmacs
    if name.startswith("deit_base"):
        assert abs(macs - 17.6) / 17.6 <= 0.01, macs  # the issue's +-1 %


def test_fused_attention_is_counted():
    """The fused CPU kernel must count like the explicit q@k^T and attn@v matmuls."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=2).eval()
    fused = count_macs(model)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    unfused = count_macs(model)
    assert fused == unfused


def test_attention_flops_formula():
    assert attention_flops((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)) == 2 * 2 * 3 * 5 * 7 * (4 + 6)


def test_macs_are_per_image_and_precision_independent():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    one = count_macs(model, batch_size=1)
    assert count_macs(model, batch_size=3) == one
    assert count_macs(prepare_model(model, "bf16", CPU)) == one


# --------------------------------------------------------------------------- timing and memory
def test_interleaved_rounds_and_counts():
    log = []
    fns = [lambda: log.append("a"), lambda: log.append("b")]
    res = interleaved_throughput(fns, [4, 2], CPU, repeats=3, min_repeat_seconds=0.0, warmup=1)
    assert [len(r) for r in res] == [3, 3]
    assert all(v > 0 for r in res for v in r)
    # calibration: one warm-up and one timed call each (a a b b), then the rounds a b a b a b
    assert log == ["a", "a", "b", "b"] + ["a", "b"] * 3
    lat = interleaved_latency(fns, CPU, runs=5, warmup=0)
    assert [len(s) for s in lat] == [5, 5]
    assert log[-10:] == ["a", "b"] * 5  # latency samples alternate A B A B


def test_percentiles_order():
    p = percentiles(list(range(1, 101)))
    assert p["p50"] <= p["p90"] <= p["p99"] <= 100
    assert p["p50"] == pytest.approx(50.5)


def test_cpu_peak_memory_sees_an_allocation():
    def allocate():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(t.sum())

    mb, kind = peak_memory(allocate, CPU)
    if mb is None:
        pytest.skip(kind)
    assert 50 <= mb <= 200, mb


def test_int8_weights_are_smaller():
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    fp32, int8 = weights_bytes(model), weights_bytes(prepare_model(model, "int8", CPU))
    assert fp32 == 4 * count_params(model)
    assert int8 < fp32 / 2.5


# --------------------------------------------------------------------------- energy readers
def _domain(root, name, uj, max_uj=1000_000_000, label="package-0"):
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (d / "name").write_text(label + "\n")
    return d


def test_counter_wrap():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 999) == 150  # 900 -> 999 -> 0 -> 50


def test_rapl_sums_packages_ignores_subdomains_and_wraps(tmp_path):
    p0 = _domain(tmp_path, "intel-rapl:0", 999_000_000)
    p1 = _domain(tmp_path, "intel-rapl:1", 5_000_000, label="package-1")
    core = _domain(tmp_path, "intel-rapl:0:0", 0, label="core")
    counter = RaplCounter(tmp_path)
    assert [d.name for d in counter.domains] == ["intel-rapl:0", "intel-rapl:1"]
    (p0 / "energy_uj").write_text("500000\n")  # wrapped: 999 J -> 1000 J (max) -> 0.5 J
    (p1 / "energy_uj").write_text("7000000\n")
    (core / "energy_uj").write_text("99000000\n")
    assert counter.read() == pytest.approx((1_000_000 + 1 + 500_000 + 2_000_000) / 1e6)


def test_rapl_unavailable_reasons(tmp_path, monkeypatch):
    with pytest.raises(EnergyUnavailable, match="does not exist"):
        RaplCounter(tmp_path / "nope")
    with pytest.raises(EnergyUnavailable, match="no RAPL package domain"):
        RaplCounter(tmp_path)
    import vitfab.measure.energy as energy

    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "nope")
    res = measure_energy(lambda: None, 4, CPU)
    assert res.joules_per_img is None and res.source == "unavailable" and "does not exist" in res.reason


def test_rapl_permission_denied(tmp_path, monkeypatch):
    """Since Linux 5.10 energy_uj is root-only; tests may run as root, so deny the read here."""
    _domain(tmp_path, "intel-rapl:0", 1)
    real = Path.read_text

    def read_text(self, *a, **k):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(EnergyUnavailable, match="permission denied"):
        RaplCounter(tmp_path)


def test_measure_energy_over_rapl_files(tmp_path):
    """Each call 'burns' 0.3 J on a counter that wraps every 1 J: J/img must come out exact."""
    d = _domain(tmp_path, "intel-rapl:0", 0, max_uj=999_999)
    state = {"uj": 0}

    def work():
        state["uj"] = (state["uj"] + 300_000) % 1_000_000
        (d / "energy_uj").write_text(str(state["uj"]))

    res = measure_energy(work, images_per_call=4, device=CPU, counter=RaplCounter(tmp_path), min_seconds=0.05,
                         warmup=0)
    assert res.source == "rapl"
    assert res.joules_per_img == pytest.approx(0.3 / 4)
    assert res.images % 4 == 0 and res.seconds >= 0.05


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: a total-energy counter in mJ that grows by 250 mJ per read."""

    class NVMLError(Exception):
        pass

    def __init__(self, supported=True):
        super().__init__("pynvml")
        self.supported, self.mj, self.inited, self.shut = supported, 1_000_000, 0, 0

    def nvmlInit(self):
        self.inited += 1

    def nvmlShutdown(self):
        self.shut += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA Fake100"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError("Not Supported")
        self.mj += 250
        return self.mj


def test_nvml_counter_reads_joules():
    fake = FakeNvml()
    c = NvmlCounter(0, fake)
    assert c.name == "NVIDIA Fake100"
    assert c.read() == pytest.approx(0.25)
    assert c.read() == pytest.approx(0.5)
    res = measure_energy(lambda: None, 8, CPU, counter=c, min_seconds=0.0, warmup=0)
    assert res.source == "nvml" and res.joules_per_img == pytest.approx(0.25 / 8)


def test_nvml_through_pynvml_module_and_unsupported(monkeypatch):
    fake = FakeNvml(supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(EnergyUnavailable, match="Not Supported"):
        open_energy_counter(torch.device("cuda:0"))
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert open_energy_counter(torch.device("cuda:0")).name == "NVIDIA Fake100"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(EnergyUnavailable, match="nvidia-ml-py is not installed"):
        open_energy_counter(torch.device("cuda:0"))
