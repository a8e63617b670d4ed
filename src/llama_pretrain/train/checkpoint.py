"""Writing training checkpoints, and restoring one into a live model and optimizer.

The layout and the read side (verification, safe unpickling, weights-only loading) are in
``interop/training_checkpoint.py``. A checkpoint is written under a temporary name, fsynced and
renamed, so a crash never leaves a half-written checkpoint under its final name; the next save
removes what a killed one left. A save that runs out of space (disk or quota) removes its partial
files and is a one-line UserError giving the bytes needed and free; a warning comes first when the
free space is already too small. Only tensors go through DCP (the optimizer's hyper-parameters are
rebuilt from the config).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import UserError
from ..fsutil import fsync_dir, sha256_file
from ..interop.training_checkpoint import (STATE_FILE, SUMS_FILE, list_checkpoints, payload_files,
                                            quiet_single_process, safe_reader, step_dir_name)
from .distributed import barrier, gather_object
from .report import say


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model weights and optimizer moments keyed by parameter name (tensors only)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    is_main: bool, keep_last: int) -> Path:
    """Write ``ckpt_root/step-NNNNNNN`` atomically (all ranks call this), then delete all but the
    newest ``keep_last``; returns its path. A full disk or quota is a UserError, after the partial
    files are removed (the previous checkpoints are untouched)."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    tensors = _tensor_state(model, optimizer)
    needed = sum(gather_object(_local_bytes(tensors))) + len(json.dumps(trainer_state))
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpt_root)
        _warn_if_short(ckpt_root, step, needed)
        tmp.mkdir()
    barrier()
    failure = _write(tmp, tensors, trainer_state, is_main)
    if any(gather_object(failure is not None)):  # rank 0's seal may fail alone: every rank stops
        free = shutil.disk_usage(ckpt_root).free
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise _explain(failure, ckpt_root, step, needed, free) from failure
    if is_main:
        if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write(tmp: Path, tensors: dict[str, Any], trainer_state: dict[str, Any], is_main: bool) -> BaseException | None:
    """DCP's collective write, then (rank 0) the seal; the exception that stopped it, if any."""
    try:
        with quiet_single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        barrier()
        if is_main:
            _seal(tmp, trainer_state)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException; _explain classifies both
        return e
    return None


def _local_bytes(tensors: Any) -> int:
    """Bytes of this rank's tensors (its shards under FSDP): what it writes."""
    if isinstance(tensors, dict):
        return sum(_local_bytes(v) for v in tensors.values())
    if not isinstance(tensors, torch.Tensor):
        return 0
    t = tensors.to_local() if hasattr(tensors, "to_local") else tensors
    return t.numel() * t.element_size()


def _remove_leftovers(ckpt_root: Path) -> None:
    """Partial checkpoints of a job killed while saving (the run lock says none is being written)."""
    for tmp in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _warn_if_short(ckpt_root: Path, step: int, needed: int) -> None:
    free = shutil.disk_usage(ckpt_root).free
    if free < needed:
        say(f"warning: the checkpoint of step {step} needs about {needed:,} bytes and {ckpt_root} has "
            f"{free:,} free; it will not fit (older checkpoints are deleted only after it is written)")


_FULL = {errno.ENOSPC, errno.EDQUOT}


def _explain(failure: BaseException | None, ckpt_root: Path, step: int, needed: int, free: int) -> BaseException:
    """A full disk or quota as a one-line UserError; anything else stays the bug it is. DCP and
    torch.save hide the OSError (torch.save's zip writer says "unexpected pos"), so the free space
    left at the failure decides too."""
    if failure is None:  # another rank failed; it reports the reason
        return UserError(f"the checkpoint of step {step} failed on another rank; partial files removed")
    if not (_FULL & _errnos(failure)) and free >= needed:
        return failure
    previous = list_checkpoints(ckpt_root)
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
    return UserError(f"no space for the checkpoint of step {step} in {ckpt_root}: it needs about {needed:,} "
                     f"bytes, {free:,} were free; partial files removed, {kept}")


def _errnos(e: BaseException) -> set[int]:
    """The errno of ``e`` and of everything it wraps (DCP keeps per-rank failures in ``failures``)."""
    found, seen, todo = set(), set(), [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            found.add(x.errno)
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
        todo += [pair[0] for pair in getattr(x, "failures", {}).values()]  # (exception, traceback)
    return found


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
