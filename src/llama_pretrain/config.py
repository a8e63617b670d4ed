"""Model configuration: Meta's ``ModelArgs`` fields, the Llama 1/2 presets and validation.

Field names follow Meta's reference implementation so a ``params.json`` maps onto this class
directly. Sizes of the paper's models come from Table 1 of the Llama 2 paper and Meta's released
configs; the FFN width follows Meta's rule (see ``ModelConfig.hidden_dim``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass
class ModelConfig:
    """Shape of a Llama transformer. Validated at construction."""

    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); ``None`` means ``n_heads`` (no GQA)."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size (rows of the embedding and of the output head)."""
    multiple_of: int = 256
    """The FFN hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional factor applied to the FFN hidden size before rounding (Llama 2 34B/70B)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 4096
    """Context length the model is trained for (size of the RoPE table and of KV caches)."""
    peak_lr: float = 3.0e-4
    """Peak learning rate from Table 1 (not part of the architecture; used by training)."""

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """FFN hidden size by Meta's rule: multiple_of * ceil(mult * int(2/3 * 4 * dim) / multiple_of)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"model.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise UserError(f"model.{name} must be positive, got {value}")
        if self.n_kv_heads is not None:
            if isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int):
                raise UserError(f"model.n_kv_heads must be an integer or null, got {self.n_kv_heads!r}")
            if self.n_kv_heads <= 0:
                raise UserError(f"model.n_kv_heads must be positive, got {self.n_kv_heads}")
        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise UserError(f"model head dim (dim/n_heads = {self.head_dim}) must be even for RoPE")
        for name in ("norm_eps", "rope_theta", "peak_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"model.{name} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise UserError(f"model.{name} must be finite, got {value!r}")
        if self.ffn_dim_multiplier is not None:
            v = self.ffn_dim_multiplier
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise UserError(f"model.ffn_dim_multiplier must be a positive number or null, got {v!r}")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls.from_dict(fields, where=f"preset {name}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(
                f"{where}: unknown model field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        data = read_json_object(path)
        data = data.get("model", data)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in data.items() if k in known or k not in _IGNORED_KEYS},
                             where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may appear in a saved config next to the model fields (format markers, Meta extras).
_IGNORED_KEYS = {"format", "format_version", "preset", "use_scaled_rope", "_name"}


# Llama 1 and Llama 2 from the paper (Table 1; Meta's released params.json), plus small shapes for
# CPU work and tests. ``peak_lr`` is Table 1's learning rate; the small presets use larger rates
# as small models tolerate them.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096, peak_lr=3.0e-4),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096, peak_lr=3.0e-4),
    "llama2-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0,
                       max_seq_len=4096, peak_lr=1.5e-4),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3, max_seq_len=4096, peak_lr=1.5e-4),
    "llama1-7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=2048, peak_lr=3.0e-4),
    "llama1-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=2048, peak_lr=3.0e-4),
    "llama1-33b": dict(dim=6656, n_layers=60, n_heads=52, max_seq_len=2048, peak_lr=1.5e-4),
    "llama1-65b": dict(dim=8192, n_layers=80, n_heads=64, max_seq_len=2048, peak_lr=1.5e-4),
    # ~1B-parameter shape for single-GPU throughput checks (GQA 16/8, context 4096).
    "llama2-1b": dict(dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=4096,
                      peak_lr=3.0e-4),
    # Benchmark shape: dim 512, 8 layers, GQA 8/4, 32k vocabulary.
    "llama2-small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, multiple_of=256,
                         max_seq_len=1024, peak_lr=1.0e-3),
    # The default CPU job: trains at thousands of tokens/s on 2 cores.
    "llama2-tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096,
                        multiple_of=32, max_seq_len=256, peak_lr=3.0e-3),
    # Tests: smallest shape that still exercises GQA.
    "llama2-debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                         multiple_of=32, max_seq_len=128, peak_lr=1.0e-3),
}


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
        from .interop.hf import config_from_hf
        return config_from_hf(data, str(path))
    if path.name == "params.json":  # Meta: vocab_size -1 means "the tokenizer's"; no context stored
        data = {k: v for k, v in data.items()
                if k not in _IGNORED_KEYS and not (k == "vocab_size" and isinstance(v, int) and v <= 0)}
        data.setdefault("max_seq_len", 4096)
        return ModelConfig.from_dict(data, where=str(path))
    return ModelConfig.from_json(path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any problem is a one-line UserError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
