"""The events of a training run, and the callbacks that hear of them.

The loop (``loop.py``) calls a ``CallbackList`` at each event; each reporting job (run.json,
metrics.jsonl and TensorBoard, W&B, energy, progress, MFU, the summary: ``report.py``) is one
``Callback`` that gets what it needs through the events, never the trainer. A new monitor is a new
callback: neither the loop nor the other callbacks change.

Per optimizer step the events come in this order: ``on_step`` right after the optimizer step,
``on_step_end`` once validation and downstream scores are in the step's metrics line, ``on_log``
when the line is complete. The events are frozen; what callbacks add to a step's line (MFU,
energy) goes into its ``line`` dict, which the loop also extends (validation, downstream scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from .config import RunConfig
from .distributed import DistInfo


@dataclass(frozen=True)
class Peak:
    """The peak FLOP/s of one device that MFU divides by, and where that figure comes from."""
    flops: float
    source: str

    @property
    def measured(self) -> bool:
        """Measured on this CPU (not a datasheet or configured figure): a busy machine can spoil it."""
        return self.source.startswith("measured")


@dataclass(frozen=True)
class RunStart:
    """Reporting starts: after build and resume, before the first step of this process."""
    run_dir: Path
    cfg: RunConfig
    info: DistInfo
    identity: dict[str, Any]
    """What makes two runs the same run (``loop.run_identity``)."""
    model_cfg: ModelConfig
    seq_len: int
    accum: int
    """Gradient accumulation steps."""
    precision: str
    peak: Peak
    flops_per_token: float
    n_params: int
    float8: str
    """The float8 part of the banner ("" without float8)."""
    step: int
    """Where this process starts (0, or the step it resumed)."""
    elapsed_s: float
    energy: dict[str, float]
    """Energy and carbon of the runs this one resumed (kwh, tco2eq)."""


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step's figures. ``line`` is its metrics line (metrics.jsonl's order), which
    starts with them; ``mfu`` stays None until ``MfuCallback`` measures it."""
    step: int
    loss: float
    """Mean loss over the global batch (all ranks)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    seconds: float
    skipped: bool
    """A non-finite loss or gradient: the optimizer step was skipped on every rank."""
    spike_sigma: float | None
    tokens_seen: int
    tokens_per_s: float
    elapsed_s: float
    """Training wall time so far, over this run and every run it resumed."""
    line: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        finite = math.isfinite(self.loss)
        self.line.update({
            "step": self.step, "loss": self.loss if finite else None,
            "perplexity": math.exp(min(self.loss, 50.0)) if finite else None,
            "lr": self.lr, "grad_norm": self.grad_norm if math.isfinite(self.grad_norm) else None,
            "tokens_seen": self.tokens_seen, "tokens_per_s": self.tokens_per_s, "mfu": None,
            "step_time_s": self.seconds, "elapsed_s": self.elapsed_s})
        if self.skipped:
            self.line["skipped"] = "non-finite loss or gradient"
        elif self.spike_sigma is not None:
            self.line["loss_spike_sigma"] = self.spike_sigma


@dataclass(frozen=True)
class LogEvent:
    """A finished step, validation and downstream scores included."""
    step: StepEvent
    eval_headline: str | None = None
    """The step's main downstream score as the progress line shows it; None when it has none."""

    @property
    def line(self) -> dict[str, Any]:
        return self.step.line


class Callback:
    """A training monitor: every hook does nothing unless overridden."""

    def on_start(self, run: RunStart) -> None:
        """Before the first step of this process (rank 0's callbacks open their files)."""

    def on_step(self, step: StepEvent) -> None:
        """The optimizer step is done; validation and downstream scores are still to come."""

    def on_step_end(self, log: LogEvent) -> None:
        """The step is done, evaluation included: add what was measured over it to ``log.line``."""

    def on_log(self, log: LogEvent) -> None:
        """The step's metrics line is complete: write it, show it."""

    def on_close(self) -> None:
        """The run stops, finished or preempted: close what ``on_start`` opened."""

    def on_end(self) -> dict[str, Any] | None:
        """The run finished (after ``on_close``): the run's summary, or None."""
        return None


class CallbackList:
    """Calls each hook of every callback in list order, but ``on_close`` in reverse (what started
    last stops first)."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_start(self, run: RunStart) -> None:
        for cb in self.callbacks:
            cb.on_start(run)

    def on_step(self, step: StepEvent) -> None:
        for cb in self.callbacks:
            cb.on_step(step)

    def on_step_end(self, log: LogEvent) -> None:
        for cb in self.callbacks:
            cb.on_step_end(log)

    def on_log(self, log: LogEvent) -> None:
        for cb in self.callbacks:
            cb.on_log(log)

    def on_close(self) -> None:
        for cb in reversed(self.callbacks):
            cb.on_close()

    def on_end(self) -> dict[str, Any]:
        """The summaries the callbacks return, merged ({} when none does, as on ranks other than 0)."""
        summary: dict[str, Any] = {}
        for cb in self.callbacks:
            summary.update(cb.on_end() or {})
        return summary
