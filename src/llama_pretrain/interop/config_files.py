"""A ModelConfig from whatever config file a user points at: ours, Hugging Face's, Meta's, a run config."""

from __future__ import annotations

from pathlib import Path

from ..config import NON_MODEL_KEYS, ModelConfig, read_json_object, read_toml
from ..errors import UserError
from .hf import config_from_hf
from .meta import check_scaled_rope
from .native import read_native_config


def model_config_from_file(path: str | Path) -> ModelConfig:
    """A ModelConfig from a JSON file (model fields, our config.json, HF config.json or Meta
    params.json) or a TOML run config's ``[model]`` section (``preset`` plus overrides)."""
    path = Path(path)
    if path.is_dir():
        for name in ("config.json", "params.json"):
            if (path / name).is_file():
                return model_config_from_file(path / name)
        raise UserError(f"{path}: no config.json or params.json in this directory")
    if path.suffix == ".toml":
        data = read_toml(path)
        section = data.get("model", data)
        if not isinstance(section, dict):
            raise UserError(f"{path}: [model] must be a table")
        section = dict(section)
        preset = section.pop("preset", None)
        if preset is not None:
            return ModelConfig.from_preset(preset, **section)
        return ModelConfig.from_dict(section, where=str(path))
    data = read_json_object(path)
    if "model_type" in data or "architectures" in data:
        return config_from_hf(data, str(path))
    if path.name == "params.json":  # Meta: vocab_size -1 means "the tokenizer's"; no context stored
        check_scaled_rope(data, path)
        data = {k: v for k, v in data.items()
                if k not in NON_MODEL_KEYS and not (k == "vocab_size" and isinstance(v, int) and v <= 0)}
        data.setdefault("max_seq_len", 4096)
        return ModelConfig.from_dict(data, where=str(path))
    return read_native_config(path)
