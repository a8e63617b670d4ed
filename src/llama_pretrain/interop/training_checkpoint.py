"""Reading training checkpoints (``RUN_DIR/checkpoints/step-NNNNNNN/``) without the trainer.

A checkpoint directory holds
- the model weights and AdamW moments written with ``torch.distributed.checkpoint`` (DCP): one
  file per rank plus ``.metadata``; reshardable to another world size on load;
- ``trainer_state.json``: the trainer's state (``train/state.py``), the resolved run config and
  the run's identity (model + data) - plain JSON;
- ``SHA256SUMS``: the sha256 of every other file, checked before anything is loaded.

This is the read side, shared by the trainer (resume), ``export-hf``, ``generate``, ``eval`` and
``train --export-checkpoint``; the write side is ``train/checkpoint.py``. Only tensors go through
DCP, and DCP's pickled ``.metadata`` is read with an unpickler that only admits DCP's own metadata
classes, so loading never runs ``torch.load`` with ``weights_only=False``. SHA256SUMS detects
damage, not tampering: whoever can change a file can recompute its sum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import UserError

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: cannot read {STATE_FILE} ({e})") from None
    if not isinstance(state, dict):
        raise UserError(f"{ckpt}: {STATE_FILE} is not a JSON object")
    return state


# -- DCP metadata without arbitrary unpickling ----------------------------------------------------
class MetadataUnpickler(pickle.Unpickler):
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


def safe_reader(path: Path):
    """A DCP ``FileSystemReader`` whose metadata goes through ``MetadataUnpickler`` and which refuses
    entries stored as pickled objects."""
    import torch.distributed.checkpoint as dcp

    class _SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as fh:
                metadata = MetadataUnpickler(fh).load()
            for key, md in metadata.state_dict_metadata.items():
                if isinstance(md, BytesStorageMetadata):  # would be read with torch.load(weights_only=False)
                    raise UserError(f"{self.path}: checkpoint entry {key} is a pickled object; refusing to load it")
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
def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Only the weights into ``model`` (plain or sharded); reshards from any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    problem = verify(ckpt)
    if problem:
        raise UserError(f"{ckpt}: damaged checkpoint ({problem})")
    sd = {"model": get_model_state_dict(model)}
    with quiet_single_process():
        dcp.load(sd, storage_reader=safe_reader(ckpt))
    set_model_state_dict(model, sd["model"])


def load_training_checkpoint(ckpt: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """(ModelConfig, full state dict on CPU, tokenizer.model or None) of a training checkpoint
    written by any number of ranks, read in one process."""
    from ..model import Transformer

    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        raise UserError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    state = read_trainer_state(ckpt)
    identity = state.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("model"), dict):
        raise UserError(f"{ckpt}: {STATE_FILE} has no model identity")
    model_cfg = ModelConfig.from_dict(identity["model"], where=str(ckpt))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)
    return model_cfg, model.state_dict(), tokenizer_of_state(state)


def training_checkpoint_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer.model a training checkpoint's run used, when it can still be found."""
    return tokenizer_of_state(read_trainer_state(Path(ckpt)))


def tokenizer_of_state(trainer_state: dict[str, Any]) -> Path | None:
    """The tokenizer of the dataset named by the run config saved in a trainer state."""
    from ..data.shards import dataset_tokenizer

    data = trainer_state.get("config", {}).get("data", {}) if isinstance(trainer_state.get("config"), dict) else {}
    if not isinstance(data, dict) or not data.get("path"):
        return None
    try:
        return dataset_tokenizer(data["path"], data.get("tokenizer") or None)
    except UserError:  # the recorded tokenizer has moved: the checkpoint is still usable without it
        return None


def export_checkpoint(ckpt: Path, out: Path, tokenizer_model: Path | None = None) -> Path:
    """Read the weights of ``ckpt`` in one process and write ``out`` (model.safetensors +
    config.json [+ tokenizer.model]) for generate / eval / export-hf."""
    from .native import save_native

    model_cfg, state, found_tokenizer = load_training_checkpoint(ckpt)
    return save_native(state, model_cfg, out, tokenizer_model=tokenizer_model or found_tokenizer)
