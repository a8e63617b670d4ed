"""Running ``llama-pretrain`` in a fresh process, alone or under torchrun."""

from __future__ import annotations

import os
import sys


def cli_env(threads: int = 1) -> dict[str, str]:
    """The environment of a CLI subprocess: ``threads`` OpenMP threads (the same kernels and
    reduction order in every process) and no Python warnings on stderr (tests read it)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def cli_cmd(*args: str, nproc: int = 0, restarts: int | None = None) -> list[str]:
    """``python -m llama_pretrain ARGS``; with ``nproc`` ranks, under torchrun on this machine
    (``--max-restarts`` only where ``restarts`` is given)."""
    if not nproc:
        return [sys.executable, "-m", "llama_pretrain", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if restarts is not None:
        torchrun.append(f"--max-restarts={restarts}")
    return [*torchrun, "-m", "llama_pretrain", *args]
