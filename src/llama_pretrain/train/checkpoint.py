"""Training checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/``.

Each checkpoint directory holds
- the model weights and AdamW moments written with ``torch.distributed.checkpoint`` (DCP): one
  file per rank plus ``.metadata``; single-process now, sharded under FSDP, and reshardable to
  another world size on load;
- ``trainer_state.json``: step, tokens seen, data-loader positions (one per rank), RNG states
  (base64), the resolved run config and the run's identity (model + data) - plain JSON;
- ``SHA256SUMS``: the sha256 of every other file, checked before anything is loaded.

Safety: the directory is written under a temporary name, fsynced and renamed, so a crash never
leaves a half-written checkpoint under its final name. Only tensors go through DCP (the optimizer's
hyper-parameters are rebuilt from the config), so loading never runs ``torch.load`` with
``weights_only=False``, and DCP's pickled ``.metadata`` is read with an unpickler that only admits
DCP's own metadata classes. A checkpoint whose checksums fail is skipped with a warning and the
previous one is used.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import UserError
from ..fsutil import fsync_dir

STATE_FILE = "trainer_state.json"
SUMS_FILE = "SHA256SUMS"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- DCP metadata without arbitrary unpickling ----------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    _ALLOWED_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "slice"}

    def find_class(self, module: str, name: str):
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "builtins" and name in self._ALLOWED_BUILTINS)
            or (module == "collections" and name == "OrderedDict")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "Path"))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):  # would be read with torch.load(weights_only=False)
                raise UserError(f"{self.path}: checkpoint entry {key} is a pickled object; refusing to load it")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- what goes into DCP ---------------------------------------------------------------------------
def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model weights and optimizer moments keyed by parameter name (tensors only)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    is_main: bool, keep_last: int) -> Path:
    """Write ``ckpt_root/step-NNNNNNN`` atomically (all ranks call this); returns its path."""
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(_tensor_state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    _barrier()
    if is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        sums = "".join(f"{_sha256(f)}  {f.relative_to(tmp).as_posix()}\n" for f in _payload_files(tmp))
        (tmp / SUMS_FILE).write_text(sums)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_root)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _payload_files(d: Path) -> list[Path]:
    return sorted(f for f in d.rglob("*") if f.is_file() and f.name != SUMS_FILE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(ckpt: Path) -> str | None:
    """None when every file matches SHA256SUMS, else the reason it does not."""
    sums = ckpt / SUMS_FILE
    if not sums.is_file():
        return "no SHA256SUMS"
    expected = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    actual = {f.relative_to(ckpt).as_posix() for f in _payload_files(ckpt)}
    if set(expected) != actual:
        return f"files differ from SHA256SUMS ({sorted(set(expected) ^ actual)[:3]})"
    for name, digest in expected.items():
        if _sha256(ckpt / name) != digest:
            return f"checksum mismatch in {name}"
    return None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: cannot read {STATE_FILE} ({e})") from None


def latest_valid(ckpt_root: Path, warn=None) -> Path | None:
    """The newest checkpoint whose checksums hold; damaged newer ones are reported through ``warn``."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: checkpoint {ckpt} is damaged ({problem}); falling back to the previous one")
    return None


def load_checkpoint(ckpt: Path, model, optimizer) -> dict[str, Any]:
    """Load weights and optimizer moments into ``model``/``optimizer`` (any world size); returns the
    trainer state."""
    state = _tensor_state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, storage_reader=_SafeReader(str(ckpt)))
    _, full_optim = get_state_dict(model, optimizer)
    full_optim["state"] = state["optim"]["state"]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=full_optim)
    return read_trainer_state(ckpt)


def load_model_weights(ckpt: Path, model) -> None:
    """Only the weights (e.g. to export a checkpoint); reshards from any world size."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    problem = verify(ckpt)
    if problem:
        raise UserError(f"{ckpt}: damaged checkpoint ({problem})")
    sd = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        dcp.load(sd, storage_reader=_SafeReader(str(ckpt)))
    set_model_state_dict(model, sd["model"])


# -- RNG state as JSON ----------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    state = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_object(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-element list in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["save_checkpoint", "load_checkpoint", "load_model_weights", "latest_valid", "list_checkpoints",
           "verify", "read_trainer_state", "rng_state", "set_rng_state", "gather_object"]
