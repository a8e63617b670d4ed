"""The data-parallel test run (tests/test_parallel.py, tests/test_tensor_parallel.py): one process
or torchrun ranks on CPU (gloo), and the comparisons that say two runs are the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from helpers.cli import cli_cmd, cli_env
from helpers.runs import as_flags, data_config, read_metrics, tiny_run

# 4 x 32-token sequences per micro-batch across ranks... global batch 256 tokens = 8 sequences:
# 1 process x micro-batch 2 x accumulation 4, or 2 processes x micro-batch 2 x accumulation 2.
# The warm-up outlasts the run, so a run's LRs do not depend on max_steps (resumes may extend it).
COMMON = as_flags(tiny_run({"schedule.warmup_steps": 100, "optimizer.lr": 1e-2, "checkpoint.every_steps": 2,
                            "training.device": "cpu"}))


def parallel_cmd(nproc: int, data: Path, run_dir: Path, *extra: str, restarts: int = 0) -> list[str]:
    """`train` of ``data`` into ``run_dir``: in one process (nproc 0) or under torchrun."""
    args = ["train", "--config", str(data_config(data, run_dir)), "--run-dir", str(run_dir), *COMMON, *extra]
    return cli_cmd(*args, nproc=nproc, restarts=restarts)


def train(nproc: int, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(parallel_cmd(nproc, data, run_dir, *extra), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for rec in read_metrics(run_dir):
        assert rec["step"] not in out, f"step {rec['step']} logged twice"
        out[rec["step"]] = rec["loss"]
    return out


def grad_norms(run_dir: Path) -> list[float]:
    return [rec["grad_norm"] for rec in read_metrics(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_run(a: Path, b: Path, steps: list[int] | None = None, atol: float = 2e-5) -> None:
    la, lb = losses(a), losses(b)
    for step in steps or sorted(la):
        assert lb[step] == pytest.approx(la[step], abs=atol), f"step {step}: {la[step]} vs {lb[step]}"
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=1e-4, msg=name)
