"""The run config of `llama-pretrain train`: plain dataclasses, TOML in, `--section.key=value` on top.

A run config has the sections ``model`` (a preset plus any ``ModelConfig`` field), ``data``,
``optimizer``, ``schedule``, ``training``, ``checkpoint``, ``logging`` and ``parallel``. Every key has
a default here; TOML files and command-line overrides change them. Validation happens once, in
``RunConfig.validate``, and names the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, read_toml
from ..errors import UserError


@dataclass
class DataSection:
    path: str = ""
    """A prepared shard directory (output of `llama-pretrain data prepare`)."""
    val_split: str = "val"
    """Split used for validation loss; empty to disable validation."""
    tokenizer: str = ""
    """tokenizer.model the shards were made with (copied into RUN_DIR/final); empty: look in data.path."""


@dataclass
class OptimizerSection:
    lr: float | None = None
    """Peak learning rate; default: the preset's peak_lr (Table 1)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    """Applied to 2-D weight matrices of linear layers only (see train/optim.py)."""
    decay_embeddings: bool = False
    """Also decay the token-embedding table (off: an embedding row is only updated when its token occurs)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    implementation: str = "auto"
    """AdamW kernel: auto (fused on GPU, foreach on CPU), fused, foreach or for-loop."""


@dataclass
class ScheduleSection:
    warmup_steps: int = 2000
    """Linear warm-up length in optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at min_lr_ratio * peak at the last step."""


@dataclass
class TrainingSection:
    max_steps: int = 1000
    """Optimizer steps (each one global batch)."""
    seq_len: int = 0
    """Tokens per sequence; 0 means the model's max_seq_len."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on each rank."""
    global_batch_tokens: int = 4_194_304
    """Tokens per optimizer step over all ranks (paper: 4M)."""
    seed: int = 0
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    fused_loss: str = "auto"
    """Chunked cross-entropy without an fp32 copy of the logits: auto (bf16 logits, or CPU), on, off."""
    eval_every_steps: int = 100
    """Validation loss every N steps (and at the last step); 0 disables it."""
    eval_batches: int = 8
    """Micro-batches per validation."""
    max_nonfinite_in_row: int = 5
    """Stop the run after this many consecutive non-finite steps."""
    spike_sigma: float = 6.0
    """Log a loss spike when loss exceeds the running mean by this many standard deviations."""
    debug_nan_at_step: int = 0
    """Testing hook: make the loss of this step (1-based) NaN; 0 disables."""


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    """Save every N steps (and always at the last step); 0: only at the end."""
    keep_last: int = 3
    """Checkpoints kept in RUN_DIR/checkpoints (oldest deleted first)."""
    export_final: bool = True
    """Write RUN_DIR/final (model.safetensors + config.json + tokenizer.model) at the end."""


@dataclass
class LoggingSection:
    every_steps: int = 1
    """metrics.jsonl gets a line every N steps."""
    progress: bool = True
    """Progress bar on stderr."""
    tensorboard: str = "auto"
    """auto (when installed), on, off: TensorBoard event files in RUN_DIR/tb."""
    peak_flops: float = 0.0
    """Peak FLOP/s for MFU; 0: the device's bf16 peak on GPU, a measured fp32 matmul peak on CPU."""


@dataclass
class ParallelSection:
    mode: str = "none"
    """none, ddp or fsdp (under torchrun)."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32. Master weights stay fp32."""
    reshard_after_forward: bool = True


SECTIONS: dict[str, type] = {
    "data": DataSection, "optimizer": OptimizerSection, "schedule": ScheduleSection,
    "training": TrainingSection, "checkpoint": CheckpointSection, "logging": LoggingSection,
    "parallel": ParallelSection,
}
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "llama2-tiny"})
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    # -- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        m = dict(self.model)
        preset = m.pop("preset", None)
        if preset is None:
            return ModelConfig.from_dict(m, where="[model]")
        return ModelConfig.from_preset(preset, **m)

    @property
    def peak_lr(self) -> float:
        return self.optimizer.lr if self.optimizer.lr is not None else self.model_config().peak_lr

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model_config().max_seq_len

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank; a UserError when the numbers do not divide."""
        t = self.training
        per_micro = self.seq_len * t.micro_batch_size * world_size
        if t.global_batch_tokens % per_micro:
            raise UserError(
                f"training.global_batch_tokens ({t.global_batch_tokens}) is not a multiple of "
                f"seq_len {self.seq_len} x micro_batch_size {t.micro_batch_size} x world size "
                f"{world_size} = {per_micro}")
        return t.global_batch_tokens // per_micro

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = dict(self.model)
        return d

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if value is None and section == "model":
                    lines.append(f'{key} = "none"')  # an explicit override (read back as None)
                elif value is None:
                    lines.append(f"# {key} = (default)")
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        cfg = self.model_config()  # validates the model section
        t, o, s = self.training, self.optimizer, self.schedule
        _positive("training.max_steps", t.max_steps)
        _positive("training.micro_batch_size", t.micro_batch_size)
        _positive("training.global_batch_tokens", t.global_batch_tokens)
        _non_negative("training.seq_len", t.seq_len)
        if self.seq_len > cfg.max_seq_len:
            raise UserError(f"training.seq_len ({self.seq_len}) exceeds model.max_seq_len ({cfg.max_seq_len})")
        _non_negative("training.eval_every_steps", t.eval_every_steps)
        _positive("training.eval_batches", t.eval_batches)
        _positive("training.max_nonfinite_in_row", t.max_nonfinite_in_row)
        _positive("training.spike_sigma", t.spike_sigma)
        _non_negative("training.debug_nan_at_step", t.debug_nan_at_step)
        _choice("training.fused_loss", t.fused_loss, ("auto", "on", "off"))
        if o.lr is not None:
            _positive("optimizer.lr", o.lr)
        for name in ("beta1", "beta2"):
            v = getattr(o, name)
            if not 0 <= v < 1:
                raise UserError(f"optimizer.{name} must be in [0, 1), got {v}")
        _positive("optimizer.eps", o.eps)
        _non_negative("optimizer.weight_decay", o.weight_decay)
        _non_negative("optimizer.grad_clip", o.grad_clip)
        _choice("optimizer.implementation", o.implementation, ("auto", "fused", "foreach", "for-loop"))
        _non_negative("schedule.warmup_steps", s.warmup_steps)
        if not 0 <= s.min_lr_ratio <= 1:
            raise UserError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        _non_negative("checkpoint.every_steps", self.checkpoint.every_steps)
        _positive("checkpoint.keep_last", self.checkpoint.keep_last)
        _positive("logging.every_steps", self.logging.every_steps)
        _non_negative("logging.peak_flops", self.logging.peak_flops)
        _choice("logging.tensorboard", self.logging.tensorboard, ("auto", "on", "off"))
        _choice("parallel.mode", self.parallel.mode, ("none", "ddp", "fsdp"))
        _choice("parallel.mixed_precision", self.parallel.mixed_precision, ("auto", "bf16", "fp32"))
        return self


# -- loading -----------------------------------------------------------------------------------
def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- ``base`` <- TOML file ``path`` <- ``overrides`` (``section.key=value``), validated."""
    cfg = RunConfig()
    if base:
        _apply_tree(cfg, base, "built-in config")
    if path is not None:
        _apply_tree(cfg, read_toml(path), str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"override {item!r} must look like section.key=value")
        section, dot, name = key.strip().removeprefix("--").partition(".")
        if not dot or not name:
            raise UserError(f"override {item!r} must look like section.key=value")
        value = raw.strip()
        if not _is_string_key(section, name) or value[:1] in ('"', "'"):
            value = _parse_value(value)  # numbers, booleans, quoted strings; paths stay as typed
        _set(cfg, section, name, value, f"--{section}.{name}")
    return cfg.validate()


def _is_string_key(section: str, name: str) -> bool:
    if section == "model":
        return name == "preset"
    cls = SECTIONS.get(section)
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return False
    return typing.get_type_hints(cls)[name] is str


def _apply_tree(cfg: RunConfig, tree: dict[str, Any], where: str) -> None:
    for section, values in tree.items():
        if section != "model" and section not in SECTIONS:
            raise UserError(f"{where}: unknown section [{section}]; known: model, {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"{where}: [{section}] must be a table")
        for name, value in values.items():
            _set(cfg, section, name, value, f"{where}: {section}.{name}")


def _set(cfg: RunConfig, section: str, name: str, value: Any, where: str) -> None:
    if section == "model":
        if name == "preset":
            if not isinstance(value, str):
                raise UserError(f"{where} must be a string, got {value!r}")
            cfg.model = {"preset": value, **{k: v for k, v in cfg.model.items() if k != "preset"}}
            return
        if name not in _MODEL_FIELDS:
            raise UserError(f"{where}: unknown key; model keys: preset, {', '.join(_MODEL_FIELDS)}")
        if value in ("none", "null") and _MODEL_FIELDS[name].default is None:
            value = None  # n_kv_heads / ffn_dim_multiplier: TOML has no null, so the word stands for it
        cfg.model[name] = value
        return
    if section not in SECTIONS:
        raise UserError(f"{where}: unknown section {section!r}; known: model, {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise UserError(f"{where}: unknown key; [{section}] keys: {', '.join(fields)}")
    hint = typing.get_type_hints(type(obj))[name]
    setattr(obj, name, _coerce(value, hint, where))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and value in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{where} cannot be empty")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.lower() in ("true", "on", "yes")
        raise UserError(f"{where} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")  # a bug in the dataclasses above


def _parse_value(raw: str) -> Any:
    """A command-line value as TOML (numbers, booleans, quoted strings); bare words stay strings."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _positive(name: str, v) -> None:
    if not v > 0:
        raise UserError(f"{name} must be positive, got {v}")


def _non_negative(name: str, v) -> None:
    if not v >= 0:
        raise UserError(f"{name} must be >= 0, got {v}")


def _choice(name: str, v: str, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
