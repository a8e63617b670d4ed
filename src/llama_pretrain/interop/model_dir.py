"""What is read from a model directory (ours, Hugging Face's, Meta's), and what never is.

- **Files of the directory only**: each file is taken by its name in the directory, must be a
  regular file (a FIFO or device would block or never end), and may be a symlink only to a file
  inside the directory, so a symlink cannot make a command read (and copy into its output) a
  private file from elsewhere. The one other place is a Hugging Face cache snapshot's links into
  ``../../blobs``, which stay inside the model's own cache folder.
- **Exactly the weights transformers reads**: ``model.safetensors``, else the files
  ``model.safetensors.index.json`` names, else ``pytorch_model.bin``, else the files of
  ``pytorch_model.bin.index.json`` (transformers' order); other weight files are never read, and
  each named file must hold exactly the tensors the index gives it.
- **No code**: a config that points transformers at a module (``auto_map``) is refused before
  anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import read_json_object
from ..errors import UserError
from ..fsutil import model_file

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# What transformers reads from a local directory for a causal LM and its tokenizer.
TRANSFORMERS_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
                      "merges.txt", "chat_template.jinja", "chat_template.json")


def read_model_json(root: str | Path, name: str) -> dict:
    """A JSON object file of a model directory (see ``model_file``)."""
    return read_json_object(model_file(root, name))


def weight_files(root: str | Path) -> list[tuple[Path, frozenset[str] | None]]:
    """The HF weight files to read, each with the tensor names its index gives it (None: the one
    unsharded file, all its tensors)."""
    root = Path(root)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        f = model_file(root, single, required=False)
        if f is not None:
            return [(f, None)]
        if model_file(root, index, required=False) is not None:
            return _indexed_files(root, index, single.rsplit(".", 1)[1])
    raise UserError(f"{root}: no {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}")


def _indexed_files(root: Path, index: str, ext: str) -> list[tuple[Path, frozenset[str] | None]]:
    where = root / index
    weight_map = read_model_json(root, index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{where}: weight_map must be a non-empty object (tensor name -> file name)")
    by_file: dict[str, set[str]] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(f".{ext}"):
            raise UserError(f"{where}: tensor {tensor!r} names {name!r}; expected a .{ext} file name "
                            "in this directory")
        by_file.setdefault(name, set()).add(tensor)
    return [(model_file(root, name), frozenset(tensors)) for name, tensors in sorted(by_file.items())]


def check_file_tensors(file: Path, names: frozenset[str] | None, found) -> None:
    """UserError unless the tensors ``found`` in ``file`` are exactly those its index gives it."""
    if names is None:
        return
    missing, extra = sorted(names - set(found)), sorted(set(found) - names)
    if missing or extra:
        raise UserError(f"{file}: holds other tensors than the index names for it (missing: {missing[:3]}, "
                        f"not in the index: {extra[:3]})")


def check_no_remote_code(root: str | Path) -> None:
    """UserError if the directory asks transformers to import code it ships (``auto_map`` in
    config.json or tokenizer_config.json) or to load another model (a PEFT adapter)."""
    root = Path(root)
    for name in ("config.json", "tokenizer_config.json"):
        if model_file(root, name, required=False) is not None and "auto_map" in read_model_json(root, name):
            raise UserError(f"{root / name}: auto_map names code shipped with the model; "
                            "llama-pretrain never runs a model directory's code")
    if os.path.lexists(root / "adapter_config.json"):
        raise UserError(f"{root / 'adapter_config.json'}: a PEFT adapter (it would load another model); "
                        "merge it into its base model first")


def check_transformers_dir(root: str | Path) -> None:
    """Before a local directory is handed to transformers: no code, and every file it would read
    a regular file inside the directory."""
    root = Path(root)
    check_no_remote_code(root)
    for name in TRANSFORMERS_FILES:
        model_file(root, name, required=False)
