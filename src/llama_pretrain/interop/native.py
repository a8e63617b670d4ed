"""llama-pretrain's own checkpoint format: ``model.safetensors`` + ``config.json``.

The directory may also hold the tokenizer the weights were trained with: ``tokenizer.model`` (a
SentencePiece model) or a Hugging Face ``tokenizer.json`` with its config files. Writing goes
through a temporary directory that is renamed into place, so an interrupted save never leaves a
half-written checkpoint under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import NON_MODEL_KEYS, ModelConfig, read_json_object
from ..errors import UserError
from ..fsutil import Owned, atomic_dir
from ..tokenizer import HF_SIDE_FILES, tokenizer_files
from .checks import check_shapes, model_config
from .model_dir import model_file, read_model_json

FORMAT = "llama-pretrain"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"

# What save_native writes: a directory holding only these files, its config.json ours, it may replace.
OUTPUT = Owned("llama-pretrain", frozenset({WEIGHTS, CONFIG, TOKENIZER, HF_TOKENIZER, *HF_SIDE_FILES}), CONFIG,
               lambda cfg: cfg.get("format") == FORMAT)


def is_native_dir(path: Path) -> bool:
    if not os.path.lexists(path / WEIGHTS) or model_file(path, CONFIG, required=False) is None:
        return False
    try:
        return read_model_json(path, CONFIG).get("format") == FORMAT
    except UserError:  # not JSON: not recognised as ours
        return False


def save_native(state_dict: dict[str, torch.Tensor], config: ModelConfig, out: str | Path,
                tokenizer_model: str | Path | None = None, extra: dict | None = None) -> Path:
    """Write weights + config (+ tokenizer) to ``out`` atomically; returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out, OUTPUT) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "model": config.to_dict(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_model is not None:
            for name, src in tokenizer_files(tokenizer_model).items():
                shutil.copyfile(src, tmp / name)
    return out


def read_native_config(path: Path) -> ModelConfig:
    """The ModelConfig of a config.json: model fields, under ``model`` or at the top level."""
    data = read_json_object(path)
    fields = data.get("model", data)
    if not isinstance(fields, dict):
        raise UserError(f"{path}: model must be a JSON object, got {type(fields).__name__}")
    return model_config({k: v for k, v in fields.items() if k not in NON_MODEL_KEYS}, path)


def load_native(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    config = read_native_config(model_file(path, CONFIG))
    weights = model_file(path, WEIGHTS)
    check_shapes(config, safetensors_shapes(weights), weights)  # before reading any tensor
    return config, read_safetensors(weights)


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors file's header, reading no tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: cannot read safetensors file ({e})") from None


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: cannot read safetensors file ({e})") from None
