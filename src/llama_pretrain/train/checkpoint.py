"""Writing training checkpoints, and restoring one into a live model and optimizer.

The layout and the read side (verification, safe unpickling, weights-only loading) are in
``interop/training_checkpoint.py``. A checkpoint is written under a temporary name, fsynced and
renamed, so a crash never leaves a half-written checkpoint under its final name. Only tensors go
through DCP (the optimizer's hyper-parameters are rebuilt from the config).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..fsutil import fsync_dir
from ..interop.training_checkpoint import (STATE_FILE, SUMS_FILE, list_checkpoints, payload_files,
                                            quiet_single_process, safe_reader, sha256_file,
                                            step_dir_name)
from .parallel import barrier


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model weights and optimizer moments keyed by parameter name (tensors only)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    is_main: bool, keep_last: int) -> Path:
    """Write ``ckpt_root/step-NNNNNNN`` atomically (all ranks call this), then delete all but the
    newest ``keep_last``; returns its path."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with quiet_single_process():
        dcp.save(_tensor_state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    barrier()
    if is_main:
        _seal(tmp, trainer_state)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _seal(tmp: Path, trainer_state: dict[str, Any]) -> None:
    """Add the trainer state and the checksums, and fsync every file."""
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
    sums = "".join(f"{sha256_file(f)}  {f.relative_to(tmp).as_posix()}\n" for f in payload_files(tmp))
    (tmp / SUMS_FILE).write_text(sums)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def restore_checkpoint(ckpt: Path, model, optimizer) -> None:
    """Load weights and optimizer moments into ``model``/``optimizer`` (from any world size)."""
    state = _tensor_state(model, optimizer)
    with quiet_single_process():
        dcp.load(state, storage_reader=safe_reader(ckpt))
    _, full_optim = get_state_dict(model, optimizer)
    full_optim["state"] = state["optim"]["state"]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=full_optim)
