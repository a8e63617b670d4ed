"""EnergyMeter: RAPL counters (with wraparound), NVML (counter and sampled power), TDP estimate."""

import sys
import time
import types

import pytest

from llama_pretrain.compute.energy import EnergyMeter


def _zone(root, name, uj, wrap=None):
    d = root / name
    d.mkdir(exist_ok=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    if wrap is not None:
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")
    return d


def test_rapl_sums_packages_ignores_subzones_and_unwraps(tmp_path):
    _zone(tmp_path, "intel-rapl:0", 990_000_000, wrap=1_000_000_000)
    _zone(tmp_path, "intel-rapl:1", 5_000_000, wrap=1_000_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 123)  # a sub-domain: already inside package 0
    meter = EnergyMeter("cpu", rapl_root=str(tmp_path), pue=1.0, intensity=0.5)
    assert meter.method == "rapl"
    meter.start()
    _zone(tmp_path, "intel-rapl:0", 20_000_000)        # wrapped: +30 J
    _zone(tmp_path, "intel-rapl:1", 15_000_000)        # +10 J
    _zone(tmp_path, "intel-rapl:0:0", 10**12)
    r = meter.read()
    assert r["method"] == "rapl"
    assert r["kwh"] == pytest.approx(40 / 3.6e6)
    assert r["tco2eq"] == pytest.approx(40 / 3.6e6 * 0.5 / 1000)
    _zone(tmp_path, "intel-rapl:0", 980_000_000)       # +960 J, no wrap
    assert meter.stop()["kwh"] == pytest.approx(1000 / 3.6e6)
    _zone(tmp_path, "intel-rapl:0", 0)
    assert meter.read()["kwh"] == pytest.approx(1000 / 3.6e6)  # frozen after stop


def test_unreadable_rapl_falls_back_to_tdp(tmp_path):
    meter = EnergyMeter("cpu", rapl_root=str(tmp_path / "missing"), cpu_tdp_w=100.0, pue=1.0)
    meter.start()
    time.sleep(0.05)
    r = meter.stop()
    assert r["method"] == "tdp-estimate"
    assert r["power_w"] == pytest.approx(100.0, rel=0.05)
    assert r["kwh"] == pytest.approx(100.0 * r["seconds"] / 3.6e6, rel=0.05)
    assert set(r) == {"kwh", "tco2eq", "method", "seconds", "power_w"}


def _fake_pynvml(counter: bool, power_mw: float = 250_000.0):
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    state = {"mj": 1_000_000}
    m.NVMLError = NVMLError
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    m.nvmlDeviceGetPowerUsage = lambda h: power_mw

    def total_energy(h):
        if not counter:
            raise NVMLError("not supported")
        return state["mj"]

    m.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return m, state


def test_nvml_energy_counter(monkeypatch):
    fake, state = _fake_pynvml(counter=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = EnergyMeter("cuda:0", pue=1.0).start()
    state["mj"] += 3_600_000  # 3600 J
    r = meter.stop()
    assert r["method"] == "nvml" and r["kwh"] == pytest.approx(0.001)


def test_nvml_sampled_power(monkeypatch):
    fake, _ = _fake_pynvml(counter=False, power_mw=300_000.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = EnergyMeter("cuda:0", sample_s=0.01).start()
    time.sleep(0.1)
    r = meter.stop()
    assert r["method"] == "nvml"
    assert r["power_w"] == pytest.approx(300.0, rel=0.05)


def test_cuda_without_nvidia_ml_py_estimates_from_gpu_tdp(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    meter = EnergyMeter("cuda", gpu_tdp_w=400.0).start()
    r = meter.read()
    assert r["method"] == "tdp-estimate" and r["power_w"] == pytest.approx(400.0, rel=0.05)
