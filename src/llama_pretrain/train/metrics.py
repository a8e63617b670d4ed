"""What a run reports: tokens/s, MFU against a stated peak, JSON lines, TensorBoard, a progress bar.

MFU follows torchtitan's definition (``compute/flops.py``): FLOPs per trained token
``6 * N_non_embedding + 12 * L * H * Q * T`` times tokens/s, divided by the peak FLOP/s of all the
devices of the run. The peak is the device's bf16 dense peak on a known GPU (H100/H200 989e12,
A100 312e12); on a CPU, which has no datasheet figure, it is the best fp32 matmul rate measured on
this machine at start-up (so CPU MFU says how close training comes to the machine's own GEMM speed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch


def measure_matmul_peak(device: torch.device | str = "cpu", n: int = 1024, dtype=torch.float32,
                        repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul on ``device`` (one warm-up, then ``repeats``)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=None)
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


def device_peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for MFU on ``device``."""
    if configured > 0:
        return configured, "configured (logging.peak_flops)"
    if device.type == "cuda":
        from ..compute.gpus import peak_flops_for_device

        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for_device(name)
        if peak:
            return peak, f"{name} bf16 dense peak"
        return measure_matmul_peak(device, 8192, torch.bfloat16), f"{name} measured bf16 matmul"
    # Do not disturb the training RNG stream: measure under a forked RNG.
    with torch.random.fork_rng(devices=[]):
        return measure_matmul_peak("cpu"), "measured fp32 matmul (1024^3) on this CPU"


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed each line) and mirrors scalars
    to TensorBoard when available. Only rank 0 creates one."""

    def __init__(self, run_dir: Path, tensorboard: str = "auto"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                if tensorboard == "on":
                    from ..errors import UserError
                    raise UserError("logging.tensorboard=on but the tensorboard package is not installed")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, step)

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
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and rec.get("step", 0) <= last_step:
            kept.append(line)
    with atomic_file(path, "w") as fh:
        fh.write("".join(l + "\n" for l in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
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
