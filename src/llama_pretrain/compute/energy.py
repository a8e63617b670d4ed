"""Energy of a run as it happens: NVML on NVIDIA GPUs, RAPL on Linux CPUs, else TDP x time.

``EnergyMeter(device)`` picks the best source the machine allows and says which it used:

- ``nvml``: NVIDIA driver counters through ``nvidia-ml-py`` (extra ``gpu``, imported lazily). The
  board's total-energy counter (mJ, Volta and newer) when present; otherwise power is sampled by a
  background thread (every ``sample_s``) and integrated (trapezoid rule).
- ``rapl``: Linux powercap counters ``/sys/class/powercap/intel-rapl:N/energy_uj`` of every CPU
  package, when readable (often root-only since 2020). Counters wrap at ``max_energy_range_uj``;
  one wrap between reads is undone, so reads should be less than a wrap apart (minutes at most
  at full load on large parts; the trainer reads at every log step).
- ``tdp-estimate``: power x elapsed seconds with power = the GPU's TDP from ``gpus.py`` on CUDA,
  or ``cpu_tdp_w`` on a CPU (default ``DEFAULT_CPU_TDP_W`` = 65 W for the whole machine, a typical
  desktop/cloud-slice package figure; override it for your part).

The energy is the device's own (IT) energy; ``tco2eq`` multiplies it by PUE and grid intensity
(``carbon.tco2eq(kwh=...)``). Counters cover the whole device, including other processes on it.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass

from .carbon import DEFAULT_INTENSITY, DEFAULT_PUE, tco2eq

DEFAULT_CPU_TDP_W = 65.0
RAPL_ROOT = "/sys/class/powercap"


class _Source:
    method = "tdp-estimate"

    def start(self) -> None:
        pass

    def joules(self, seconds: float) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TDPSource(_Source):
    method = "tdp-estimate"

    def __init__(self, watts: float):
        self.watts = float(watts)

    def start(self) -> None:
        pass

    def joules(self, seconds: float) -> float:
        return self.watts * seconds


@dataclass
class _Zone:
    path: str
    wrap: int  # the counter's range (max_energy_range_uj)
    last: int = 0  # the last raw reading
    total: int = 0  # microjoules accumulated since start()


class _RaplSource(_Source):
    """Sum of package-level RAPL counters (``intel-rapl:N``, not the ``:N:M`` sub-domains,
    which are already included in their package)."""

    method = "rapl"

    def __init__(self, root: str = RAPL_ROOT):
        self.zones: list[_Zone] = []
        for d in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
            if os.path.basename(d).count(":") != 1:
                continue
            try:
                with open(os.path.join(d, "max_energy_range_uj")) as fh:
                    wrap = int(fh.read())
            except (OSError, ValueError):
                wrap = 2**32
            path = os.path.join(d, "energy_uj")
            self._read(path)  # raises OSError when not readable: caller falls back
            self.zones.append(_Zone(path, wrap))
        if not self.zones:
            raise OSError("no RAPL package zones")
        self.start()

    @staticmethod
    def _read(path: str) -> int:
        with open(path) as fh:
            return int(fh.read())

    def start(self) -> None:
        for z in self.zones:
            z.last, z.total = self._read(z.path), 0

    def joules(self, seconds: float) -> float:
        total = 0
        for z in self.zones:
            raw = self._read(z.path)
            delta = raw - z.last
            if delta < 0:  # the counter wrapped since the last read
                delta += z.wrap
            z.last, z.total = raw, z.total + delta
            total += z.total
        return total / 1e6


class _NvmlSource(_Source):
    method = "nvml"

    def __init__(self, index: int, sample_s: float = 0.1):
        import pynvml  # nvidia-ml-py; ImportError makes the caller fall back

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.sample_s = sample_s
        self._thread: threading.Thread | None = None
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
        self.start()

    def _power_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0  # mW

    def start(self) -> None:
        self.close()
        if self.counter:
            self.mj0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            return
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._j, self._last = 0.0, (time.monotonic(), self._power_w())
        self.t_start = self._last[0]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            self._tick()

    def _tick(self) -> None:
        now, p = time.monotonic(), self._power_w()
        with self._lock:
            t, p0 = self._last
            self._j += (now - t) * (p + p0) / 2
            self._last = (now, p)

    def joules(self, seconds: float) -> float:
        if self.counter:
            return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.mj0) / 1000.0
        self._tick()
        with self._lock:
            return self._j

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


class EnergyMeter:
    """Measure (or estimate) the energy a device uses between ``start()`` and ``read()``/``stop()``.

    ``read()`` and ``stop()`` return ``dict(kwh, tco2eq, method, seconds, power_w)`` where
    ``power_w`` is the mean power over the interval and ``tco2eq`` applies ``pue`` and
    ``intensity`` (kgCO2eq/kWh) as the paper does.
    """

    def __init__(self, device="cpu", *, pue: float = DEFAULT_PUE, intensity: float = DEFAULT_INTENSITY,
                 cpu_tdp_w: float = DEFAULT_CPU_TDP_W, gpu_tdp_w: float | None = None,
                 rapl_root: str = RAPL_ROOT, sample_s: float = 0.1):
        self.pue, self.intensity = pue, intensity
        self.device = str(device)
        self.source = self._pick(rapl_root, cpu_tdp_w, gpu_tdp_w, sample_s)
        self.method = self.source.method
        self.t0: float | None = None
        self._final: dict | None = None

    def _pick(self, rapl_root, cpu_tdp_w, gpu_tdp_w, sample_s) -> _Source:
        if self.device.startswith("cuda"):
            index = self._cuda_index()
            try:
                return _NvmlSource(index, sample_s)
            except Exception:  # no nvidia-ml-py, no driver access: estimate instead
                return _TDPSource(gpu_tdp_w if gpu_tdp_w is not None else self._gpu_tdp(index))
        try:
            return _RaplSource(rapl_root)
        except (OSError, ValueError):
            return _TDPSource(cpu_tdp_w)

    def _cuda_index(self) -> int:
        if ":" in self.device:
            return int(self.device.split(":", 1)[1])
        try:
            import torch
            return torch.cuda.current_device()
        except Exception:
            return 0

    @staticmethod
    def _gpu_tdp(index: int) -> float:
        from .gpus import GPUS, gpu_for_device
        try:
            import torch
            gpu = gpu_for_device(torch.cuda.get_device_name(index))
        except Exception:
            gpu = None
        return (gpu or GPUS["a100-80gb"]).tdp_w

    def start(self) -> "EnergyMeter":
        self._begin()
        return self

    def _begin(self) -> float:
        self.source.start()
        # A sampling source integrates from its own first sample: measure time from there too, so
        # mean power = energy / time holds exactly however the threads are scheduled.
        t0 = self.t0 = getattr(self.source, "t_start", None) or time.monotonic()
        self._final = None
        return t0

    def read(self) -> dict:
        if self._final is not None:
            return dict(self._final)
        t0 = self._begin() if self.t0 is None else self.t0
        now = time.monotonic()
        joules = max(0.0, self.source.joules(now - t0))
        last_sample = getattr(self.source, "_last", None)
        seconds = (last_sample[0] if last_sample else now) - t0
        kwh = joules / 3.6e6
        return {"kwh": kwh, "tco2eq": tco2eq(kwh=kwh, pue=self.pue, intensity=self.intensity),
                "method": self.method, "seconds": seconds,
                "power_w": joules / seconds if seconds > 0 else 0.0}

    def stop(self) -> dict:
        result = self.read()
        self.source.close()
        self._final = result
        return dict(result)
