"""What a run reports: tokens/s, MFU against a stated peak, JSON lines, TensorBoard, a progress bar.

MFU follows torchtitan's definition (``compute/flops.py``): FLOPs per trained token
``6 * N_non_embedding + 12 * L * H * Q * T`` times tokens/s, divided by the peak FLOP/s of all the
devices of the run. The peak is the device's bf16 dense peak on a known GPU (H100/H200 989e12,
A100 312e12); on a CPU, which has no datasheet figure, it is the best matmul rate measured on this
machine (so CPU MFU says how close training comes to the machine's own GEMM speed). That rate is
measured once per machine and kept in a per-user cache keyed by CPU model, torch version and thread
count, so every run on one machine divides by the same peak.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..config import parse_json


def measure_matmul_peak(device: torch.device | str = "cpu", n: int = 1024, dtype=torch.float32,
                        repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul on ``device`` (one warm-up, then ``repeats``)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def resolve_precision(device: torch.device, requested: str = "auto", configured_peak: float = 0.0
                      ) -> tuple[str, float, str]:
    """(compute precision, peak FLOP/s for MFU, where the peak comes from).

    ``auto`` is bf16 on GPU. On a CPU it is bf16 only where a bf16 matmul measured here runs at
    least 1.5x faster than an fp32 one (AVX512-BF16/AMX parts), else fp32. The peak is the one of
    the precision used: the GPU's bf16 datasheet figure, or this CPU's cached matmul rate.
    """
    if device.type == "cuda":
        from ..compute.gpus import peak_flops_for_device

        name = torch.cuda.get_device_name(device)
        precision = "bf16" if requested == "auto" else requested
        peak = peak_flops_for_device(name)
        source = f"{name} bf16 dense peak"
        if not peak:
            peak, source = measure_matmul_peak(device, 8192, torch.bfloat16), f"{name} measured bf16 matmul"
    else:
        fp32 = cpu_matmul_peak("fp32")
        bf16 = cpu_matmul_peak("bf16") if requested != "fp32" else 0.0
        precision = requested if requested != "auto" else ("bf16" if bf16 >= 1.5 * fp32 else "fp32")
        peak = bf16 if precision == "bf16" else fp32
        source = f"measured {precision} matmul (1024^3) on this CPU, cached in {peak_cache_file()}"
    if configured_peak > 0:
        return precision, configured_peak, "configured (logging.peak_flops)"
    return precision, peak, source


# -- the CPU peak, measured once per machine ----------------------------------------------------------
CACHE_DIR_ENV = "LLAMA_PRETRAIN_CACHE_DIR"


def peak_cache_file() -> Path:
    """$LLAMA_PRETRAIN_CACHE_DIR, else $XDG_CACHE_HOME/llama-pretrain, else ~/.cache/llama-pretrain."""
    root = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                 "llama-pretrain")
    return Path(root) / "matmul_peak.json"


def machine_key() -> str:
    """What the CPU matmul peak depends on: the CPU model, the torch build, the threads it may use."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_peak_cache() -> dict[str, dict[str, float]]:
    """The cache as {machine key: {precision: FLOP/s}}; unreadable or damaged: empty (re-measure)."""
    try:
        data = parse_json(peak_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: {p: float(v) for p, v in peaks.items() if _is_rate(v)}
            for k, peaks in data.items() if isinstance(peaks, dict)}


def _is_rate(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def store_cpu_peak(precision: str, flops: float) -> None:
    """Record a measured peak for this machine; a cache that cannot be written is not an error."""
    from ..errors import UserError
    from ..fsutil import atomic_file

    cache = _read_peak_cache()
    cache.setdefault(machine_key(), {})[precision] = flops
    try:
        with atomic_file(peak_cache_file(), "w") as fh:
            json.dump(cache, fh, indent=1)
    except (OSError, UserError):
        pass


def _measure_cpu_peak(precision: str, repeats: int = 5) -> float:
    with torch.random.fork_rng(devices=[]):  # leave the training RNG stream alone
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure_matmul_peak("cpu", 1024, dtype, repeats=repeats)


def cpu_matmul_peak(precision: str) -> float:
    """This machine's cached matmul peak for ``precision`` (fp32, bf16); measured and cached when absent."""
    cached = _read_peak_cache().get(machine_key(), {}).get(precision)
    if cached:
        return cached
    flops = _measure_cpu_peak(precision)
    store_cpu_peak(precision, flops)
    return flops


def remeasure_cpu_peak(precision: str, previous: float) -> float:
    """The peak measured again (the cached one was measured on a busy machine); the cache keeps the best."""
    flops = max(previous, _measure_cpu_peak(precision, repeats=10))
    store_cpu_peak(precision, flops)
    return flops


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each line) and mirrors scalars
    to TensorBoard when available. Only rank 0 creates one."""

    def __init__(self, run_dir: Path, tensorboard: str = "auto", resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step drops events a resumed run is about to log again, as metrics.jsonl does.
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                if tensorboard == "on":
                    from ..errors import UserError
                    raise UserError("logging.tensorboard=on but the tensorboard package is not installed") from None

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k if k.startswith(("val", "eval/")) else f"train/{k}", v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a resumed run re-does those steps)."""
    from ..fsutil import atomic_file

    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = parse_json(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            kept.append(line)
    with atomic_file(path, "w") as fh:
        fh.write("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = parse_json(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def human(n: float) -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}" if suffix else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}E"
