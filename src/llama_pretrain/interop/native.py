"""llama-pretrain's own checkpoint format: ``model.safetensors`` + ``config.json``.

The directory may also hold ``tokenizer.model`` (the SentencePiece model the weights were trained
with). Writing goes through a temporary directory that is renamed into place, so an interrupted
save never leaves a half-written checkpoint under its final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import atomic_dir

FORMAT = "llama-pretrain"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


def is_native_dir(path: Path) -> bool:
    cfg = path / CONFIG
    if not (cfg.is_file() and (path / WEIGHTS).is_file()):
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_native(state_dict: dict[str, torch.Tensor], config: ModelConfig, out: str | Path,
                tokenizer_model: str | Path | None = None, extra: dict | None = None) -> Path:
    """Write weights + config (+ tokenizer) to ``out`` atomically; returns ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "model": config.to_dict(), **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER)
    return out


def load_native(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = ModelConfig.from_json(path / CONFIG)
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path / WEIGHTS}: cannot read safetensors file ({e})") from None
    return config, state

