"""Model configuration: Meta's ``ModelArgs`` fields, the Llama 1/2 presets and validation.

Field names follow Meta's reference implementation so a ``params.json`` maps onto this class
directly. Sizes of the paper's models come from Table 1 of the Llama 2 paper and Meta's released
configs; the FFN width follows Meta's rule (see ``ModelConfig.hidden_dim``). Reading the config
of a checkpoint in another format is ``interop.config_files.model_config_from_file``: this module
imports nothing from interop, train, eval or data.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_fields import POSITIVE, check, field_type, one_of, setting
from .errors import UserError

# Upper bounds far above any released model, so a hostile config cannot size allocations beyond
# memory (a RoPE table, a model built before its weights are compared).
MAX_SIZES = {"dim": 1 << 16, "n_layers": 1 << 12, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
             "vocab_size": 1 << 22, "multiple_of": 1 << 16, "ffn_dim_multiplier": 64, "max_seq_len": 1 << 24}


@dataclass
class ModelConfig:
    """Shape of a Llama transformer. Validated at construction (sizes also by ``MAX_SIZES``)."""

    dim: int = setting(4096, POSITIVE)
    """Model (residual stream) width."""
    n_layers: int = setting(32, POSITIVE)
    """Number of transformer blocks."""
    n_heads: int = setting(32, POSITIVE)
    """Number of query heads."""
    n_kv_heads: int | None = setting(None, POSITIVE)
    """Number of key/value heads (grouped-query attention); ``None`` means ``n_heads`` (no GQA)."""
    vocab_size: int = setting(32000, POSITIVE)
    """Tokenizer vocabulary size (rows of the embedding and of the output head)."""
    multiple_of: int = setting(256, POSITIVE)
    """The FFN hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = setting(None, POSITIVE)
    """Optional factor applied to the FFN hidden size before rounding (Llama 2 34B/70B)."""
    norm_eps: float = setting(1e-5, POSITIVE)
    """RMSNorm epsilon."""
    rope_theta: float = setting(10000.0, POSITIVE)
    """RoPE base frequency."""
    rope_scaling: str | None = setting(None, one_of("llama3"))
    """RoPE frequency scaling: none (Llama 1 and 2) or ``llama3`` (Llama 3.1's: wavelengths above
    rope_original_max_seq_len / rope_low_freq_factor divided by rope_factor, those below
    rope_original_max_seq_len / rope_high_freq_factor kept, a smooth blend between)."""
    rope_factor: float = setting(8.0, POSITIVE)
    """``llama3`` scaling: how much the long wavelengths are stretched."""
    rope_low_freq_factor: float = setting(1.0, POSITIVE)
    """``llama3`` scaling: the original context over this is where stretching is complete."""
    rope_high_freq_factor: float = setting(4.0, POSITIVE)
    """``llama3`` scaling: the original context over this is where stretching starts."""
    rope_original_max_seq_len: int = setting(8192, POSITIVE)
    """``llama3`` scaling: the context the model was first trained for."""
    max_seq_len: int = setting(4096, POSITIVE)
    """Context length the model is trained for (size of the RoPE table and of KV caches)."""
    tie_embeddings: bool = False
    """One matrix for the token embedding and the output head (Hugging Face's
    ``tie_word_embeddings``: Llama 3.2 1B/3B, SmolLM2), saved once as ``tok_embeddings.weight``;
    False (the paper's Llama 1 and 2, every preset) gives the head its own matrix."""
    peak_lr: float = setting(3.0e-4, POSITIVE)
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
        check(self, "model.")  # each field's type and constraint, then the bounds and shape rules
        for name, high in MAX_SIZES.items():
            if getattr(self, name) is not None and getattr(self, name) > high:
                raise UserError(f"model.{name} must be at most {high}, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise UserError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise UserError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})"
            )
        if self.head_dim % 2:
            raise UserError(f"model head dim (dim/n_heads = {self.head_dim}) must be even for RoPE")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [k for k in _ROPE_SCALING if getattr(self, k) != defaults[k]]
            if changed:
                raise UserError(f"model.{changed[0]} only applies with model.rope_scaling=llama3")
        elif self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise UserError(f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must be above "
                            f"model.rope_low_freq_factor ({self.rope_low_freq_factor})")

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
        for key in data:
            field_type(cls, key, f"{where}: model.{key}")  # an unknown key is a UserError, not a TypeError
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        data = read_json_object(path)
        data = data.get("model", data)
        return cls.from_dict({k: v for k, v in data.items() if k not in NON_MODEL_KEYS}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every field, except those of features added later when unused (``tie_embeddings`` off,
        no ``rope_scaling``): a config written before them (a run's identity, a model's
        config.json) stays the same."""
        fields = dataclasses.asdict(self)
        unused = ([] if self.tie_embeddings else ["tie_embeddings"]) + (
            ["rope_scaling", *_ROPE_SCALING] if self.rope_scaling is None else [])
        return {k: v for k, v in fields.items() if k not in unused}


# The parameters of rope_scaling=llama3 (fields added after configs were first written, as was
# tie_embeddings: to_dict leaves them out when they are not used).
_ROPE_SCALING = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")


# Keys that may appear in a saved config next to the model fields (format markers, Meta extras).
NON_MODEL_KEYS = {"format", "format_version", "preset", "use_scaled_rope", "_name"}


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


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, except that a document nested too deep for the parser (which recurses per
    array / object) is a ``ValueError`` like any other malformed JSON, so every reader's existing
    ``except ValueError`` covers it instead of a RecursionError traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any problem is a one-line UserError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:  # the parser recurses per nested array / object
        raise UserError(f"{path} is not valid JSON: nested deeper than Python can parse") from None
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
            data = tomllib.load(fh)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    except RecursionError:  # the parser recurses per nested array / inline table
        raise UserError(f"{path} is not valid TOML: nested deeper than Python can parse") from None
    _check_toml_depth(data, path)
    return data


MAX_TOML_DEPTH = 32  # our configs nest 3 deep; dotted keys can nest thousands without recursing


def _check_toml_depth(data: dict, path: Path) -> None:
    """Refuse deep nesting here, iteratively, before recursive code (config trees, json) meets it."""
    stack: list[tuple[dict | list, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_TOML_DEPTH:
            raise UserError(f"{path}: tables / arrays nested more than {MAX_TOML_DEPTH} deep")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))
