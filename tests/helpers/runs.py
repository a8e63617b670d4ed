"""The tiny training run most training tests start from, and what a run leaves in metrics.jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# llama2-debug, 32-token windows, micro-batch 2, a 256-token global batch, fp32, no validation,
# no progress bar, no TensorBoard, a fixed peak FLOPS (no matmul measurement).
TINY_RUN: dict[str, Any] = {
    "model.preset": "llama2-debug", "training.seq_len": 32, "training.micro_batch_size": 2,
    "training.global_batch_tokens": 256, "training.eval_every_steps": 0, "logging.progress": False,
    "logging.peak_flops": 1e11, "logging.tensorboard": "off", "parallel.mixed_precision": "fp32"}


def tiny_run(changes: Mapping[str, Any] | None = None, *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """TINY_RUN's ``section.key`` settings with ``changes`` applied and the keys in ``drop`` left
    to the config's defaults."""
    items = {**TINY_RUN, **(changes or {})}
    for key in drop:
        del items[key]
    return items


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def as_overrides(items: Mapping[str, Any]) -> list[str]:
    """``section.key=value`` strings, as load_run_config's overrides take them."""
    return [f"{key}={_text(value)}" for key, value in items.items()]


def as_flags(items: Mapping[str, Any]) -> list[str]:
    """``--section.key=value`` command-line flags."""
    return [f"--{item}" for item in as_overrides(items)]


def data_config(data: Path, run_dir: Path) -> Path:
    """A config file naming the dataset, next to the run dir (RUN_DIR.toml)."""
    config = run_dir.parent / f"{run_dir.name}.toml"
    config.write_text(f'[data]\npath = "{data}"\n')
    return config


def read_metrics(run_dir: Path, *, missing_ok: bool = False, torn_ok: bool = False) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, one per line. ``missing_ok``: no file is no records
    (a run not started yet); ``torn_ok``: a line that is not JSON (one being written, or cut by a
    kill) is skipped rather than an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if missing_ok and not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            if not torn_ok:
                raise
    return records
