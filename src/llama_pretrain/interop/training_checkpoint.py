"""Reading training checkpoints (``RUN_DIR/checkpoints/step-NNNNNNN/``) without the trainer.

A checkpoint directory holds
- the model weights and AdamW moments written with ``torch.distributed.checkpoint`` (DCP): one
  file per rank plus ``.metadata``; reshardable to another world size on load;
- ``trainer_state.json``: the trainer's state (``train/state.py``), the resolved run config and
  the run's identity (model + data) - plain JSON;
- ``SHA256SUMS``: the sha256 of every other file, checked before anything is loaded.

This is the read side, shared by the trainer (resume), ``export-hf``, ``generate``, ``eval`` and
``train --export-checkpoint``; the write side is ``train/checkpoint.py``. Only tensors go through
DCP, and DCP's pickled ``.metadata`` is read with an unpickler that admits an exact list of DCP's
metadata classes, then checked (tensor entries only, stored in this checkpoint's own files), so
loading never runs ``torch.load`` with ``weights_only=False``. SHA256SUMS detects damage, not
tampering: whoever can change a file can recompute its sum, so everything read after it is
checked as if it were hostile, and the model is allocated only once its shapes are.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..config import ModelConfig, parse_json
from ..errors import UserError
from ..fsutil import sha256_file
from .checks import check_shapes, model_config

STATE_FILE = "trainer_state.json"
SUMS_FILE = "SHA256SUMS"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


# -- finding and verifying ------------------------------------------------------------------------
def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def payload_files(d: Path) -> list[Path]:
    """Every file of a checkpoint that SHA256SUMS covers."""
    return sorted(f for f in d.rglob("*") if f.is_file() and f.name != SUMS_FILE)


def verify(ckpt: Path) -> str | None:
    """None when every file matches SHA256SUMS, else the reason it does not."""
    sums = ckpt / SUMS_FILE
    if not sums.is_file():
        return "no SHA256SUMS"
    expected = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    actual = {f.relative_to(ckpt).as_posix() for f in payload_files(ckpt)}
    if set(expected) != actual:
        return f"files differ from SHA256SUMS ({sorted(set(expected) ^ actual)[:3]})"
    for name, digest in expected.items():
        if sha256_file(ckpt / name) != digest:
            return f"checksum mismatch in {name}"
    return None


def latest_valid(ckpt_root: Path, warn=None) -> Path | None:
    """The newest checkpoint whose checksums hold; damaged newer ones are reported through ``warn``."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    for ckpt in reversed(list_checkpoints(ckpt_root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        warn(f"warning: checkpoint {ckpt} is damaged ({problem}); falling back to the previous one")
    return None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = parse_json((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: cannot read {STATE_FILE} ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{ckpt}: {STATE_FILE} is not a JSON object")
    check_trainer_state(state, Path(ckpt) / STATE_FILE)
    return state


def check_trainer_state(state: dict[str, Any], where: Path) -> None:
    """UserError naming the field unless ``state`` has what loading and resuming read."""
    identity = state.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("model"), dict):
        raise UserError(f"{where}: identity.model is missing or not an object")
    for key in ("step", "tokens_seen"):
        if not _is_count(state.get(key)):
            raise UserError(f"{where}: {key} must be a non-negative integer, got {state.get(key)!r}")
    loaders, rngs = state.get("loader"), state.get("rng")
    if not isinstance(loaders, list) or not loaders or not all(isinstance(x, dict) for x in loaders):
        raise UserError(f"{where}: loader must be a non-empty list of objects (one per rank)")
    if not isinstance(rngs, list) or len(rngs) != len(loaders):
        raise UserError(f"{where}: rng must be a list with one entry per rank ({len(loaders)})")
    for rank, rng in enumerate(rngs):
        _check_rng(rng, f"{where}: rng[{rank}]")
    for key in ("world_size", "tp"):  # the layout that wrote it (optional; older checkpoints lack tp)
        if key in state and not (_is_count(state[key]) and state[key] >= 1):
            raise UserError(f"{where}: {key} must be a positive integer, got {state[key]!r}")
    guards = state.get("guards")
    if not (isinstance(guards, dict) and isinstance(guards.get("spike"), dict)
            and _is_count(guards.get("nonfinite_in_row"))):
        raise UserError(f"{where}: guards must hold spike (an object) and nonfinite_in_row (an integer)")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_rng(rng: Any, where: str) -> None:
    """A CPU generator state torch accepts (tried on a fresh generator, not the global one)."""
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), str):
        raise UserError(f"{where}.torch must be a base64 string")
    try:
        raw = base64.b64decode(rng["torch"], validate=True)
        torch.Generator().set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (binascii.Error, ValueError, RuntimeError) as e:
        raise UserError(f"{where}.torch is not a CPU RNG state ({str(e).splitlines()[0]})") from None
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(c, str) for c in cuda):
        raise UserError(f"{where}.cuda must be a list of base64 strings")


# -- DCP metadata without arbitrary unpickling ----------------------------------------------------
# Exactly the (module, name) pairs torch's DCP pickles into .metadata (read off torch 2.13's
# one-process and 2-rank FSDP checkpoints with pickletools), compared whole: pickle protocol 4
# resolves a dotted name attribute by attribute, so admitting a module admits all it imports
# (``torch.distributed.checkpoint.filesystem`` + ``os.system``).
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
METADATA_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                         "TensorStorageMetadata", "ChunkStorageMetadata",
                                         "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # the same class as Python 3.13 pickles it
    *(("torch", dtype) for dtype in _DTYPES),
})


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


def read_metadata_file(path: Path):
    """DCP's ``Metadata`` from a ``.metadata`` file through ``MetadataUnpickler``; any failure is a
    UserError (an error raised while building an admitted class is a bad file too)."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
    except Exception as e:  # noqa: BLE001 - whatever the pickle makes the admitted classes raise
        raise UserError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if type(metadata) is not Metadata:
        raise UserError(f"{path}: checkpoint metadata is a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


def check_metadata(metadata, ckpt: Path) -> None:
    """UserError unless every entry is a tensor stored in a file of ``ckpt`` itself, within it, and
    its chunks hold as many bytes as its shape needs (so a shape cannot claim more than the files)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    where = ckpt / ".metadata"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise UserError(f"{where}: malformed checkpoint metadata")
    held: dict[str, int] = {}
    for index, info in storage.items():
        if type(index) is not MetadataIndex or not isinstance(index.fqn, str):
            raise UserError(f"{where}: malformed storage index {index!r}")
        _check_storage_info(info, ckpt, where)
        held[index.fqn] = held.get(index.fqn, 0) + info.length
    for key, md in entries.items():
        if type(md) is not TensorStorageMetadata:  # BytesStorageMetadata: read with torch.load(weights_only=False)
            raise UserError(f"{where}: checkpoint entry {key} is not a tensor ({type(md).__name__}); "
                            "refusing to load it")
        size, dtype = getattr(md, "size", None), getattr(getattr(md, "properties", None), "dtype", None)
        if not (_is_shape(size) and dtype in _ITEMSIZE and isinstance(md.chunks, list) and all(
                type(c) is ChunkStorageMetadata and _is_shape(c.offsets) and _is_shape(c.sizes) for c in md.chunks)):
            raise UserError(f"{where}: checkpoint entry {key} has a malformed shape, dtype or chunk list")
        needed = math.prod(size) * _ITEMSIZE[dtype]
        if held.get(key, 0) < needed:
            raise UserError(f"{where}: checkpoint entry {key} of shape {tuple(size)} needs {needed} bytes; "
                            f"its files hold {held.get(key, 0)}")


def _is_shape(value: Any) -> TypeGuard[torch.Size]:
    return isinstance(value, torch.Size) and all(_is_count(n) for n in value)


_ITEMSIZE = {getattr(torch, name): getattr(torch, name).itemsize for name in _DTYPES}


def _check_storage_info(info, ckpt: Path, where: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    name = getattr(info, "relative_path", None)
    if (type(info) is not _StorageInfo or not isinstance(name, str) or name in ("", ".", "..")
            or any(c in name for c in "/\\")):  # not a plain file name
        raise UserError(f"{where}: a storage entry points outside the checkpoint ({name!r})")
    file = ckpt / name
    if not file.is_file() or file.is_symlink():
        raise UserError(f"{where}: a storage entry points at {name!r}, which is not a file of the checkpoint")
    if not (_is_count(info.offset) and _is_count(info.length) and info.offset + info.length <= file.stat().st_size):
        raise UserError(f"{where}: a storage entry reads past the end of {name}")
    if info.transform_descriptors:  # never written here; transforms decode with registered extensions
        raise UserError(f"{where}: storage entries with transforms are not supported "
                        f"({info.transform_descriptors!r})")


def safe_reader(path: Path):
    """A DCP ``FileSystemReader`` whose metadata was read through ``MetadataUnpickler`` and checked
    by ``check_metadata`` (tensors only, in the checkpoint's own files) when it was made: a refusal is
    a UserError here, not an exception wrapped by ``dcp.load``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_metadata_file(Path(path) / ".metadata")
    check_metadata(metadata, Path(path))

    class _SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader(str(path))


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


# -- reading the weights ----------------------------------------------------------------------------
def _read_weights(model: torch.nn.Module, reader) -> None:
    """Only the weights into ``model`` (plain or sharded); reshards from any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    sd = {"model": get_model_state_dict(model)}
    try:
        with quiet_single_process():
            dcp.load(sd, storage_reader=reader)
    except CheckpointException as e:  # a file that matches its metadata and checksum, yet does not read
        raise UserError(f"{reader.path}: cannot read the weights ({str(e).splitlines()[0]})") from None
    set_model_state_dict(model, sd["model"])


def load_training_checkpoint(ckpt: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """(ModelConfig, full state dict on CPU, tokenizer.model or None) of a training checkpoint
    written by any number of ranks, read in one process. Checksums, the trainer state and the
    model's shapes in DCP's metadata are checked before the model is allocated."""
    from ..model import Transformer

    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        raise UserError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    problem = verify(ckpt)
    if problem:
        raise UserError(f"{ckpt}: damaged checkpoint ({problem})")
    state = read_trainer_state(ckpt)
    model_cfg = model_config(state["identity"]["model"], f"{ckpt / STATE_FILE}: identity")
    reader = safe_reader(ckpt)
    check_shapes(model_cfg, stored_model_shapes(reader), ckpt / ".metadata")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    _read_weights(model, reader)
    return model_cfg, model.state_dict(), tokenizer_of_state(state)


def stored_model_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the model's tensors as a ``safe_reader``'s (checked) metadata declares them."""
    return {key.removeprefix("model."): tuple(md.size)
            for key, md in reader.read_metadata().state_dict_metadata.items() if key.startswith("model.")}


def training_checkpoint_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer.model a training checkpoint's run used, when it can still be found."""
    return tokenizer_of_state(read_trainer_state(Path(ckpt)))


def tokenizer_of_state(trainer_state: dict[str, Any]) -> Path | None:
    """The tokenizer of the dataset named by the run config saved in a trainer state."""
    from ..data.shards import datasets_tokenizer

    data = trainer_state.get("config", {}).get("data", {}) if isinstance(trainer_state.get("config"), dict) else {}
    if not isinstance(data, dict) or not data.get("path"):
        return None
    try:
        dirs = data["path"] if isinstance(data["path"], list) else [data["path"]]  # one dir or several
        return datasets_tokenizer(dirs, data.get("tokenizer") or None)
    except UserError:  # the recorded tokenizer has moved: the checkpoint is still usable without it
        return None


def export_checkpoint(ckpt: Path, out: Path, tokenizer_model: Path | None = None) -> Path:
    """Read the weights of ``ckpt`` in one process and write ``out`` (model.safetensors +
    config.json [+ tokenizer.model]) for generate / eval / export-hf."""
    from .native import save_native

    model_cfg, state, found_tokenizer = load_training_checkpoint(ckpt)
    return save_native(state, model_cfg, out, tokenizer_model=tokenizer_model or found_tokenizer)
