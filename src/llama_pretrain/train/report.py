"""What a training run tells its user, one callback (``callbacks.py``) per job: run.json,
metrics.jsonl (+ TensorBoard), W&B, energy, MFU, progress and the summary.

Only rank 0 writes files and prints: ``reporting_callbacks`` gives it every callback and the other
ranks only the MFU one (every rank measures its step's MFU, as every rank builds the line). Progress
is a tqdm bar on a terminal; when stderr is a file (a batch job) or ``logging.progress=false`` it
is one plain line every ``logging.every_steps`` steps instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..config import parse_json
from ..fsutil import atomic_file
from . import metrics
from .callbacks import Callback, CallbackList, LogEvent, Peak, RunStart, StepEvent
from .config import RunConfig
from .state import FORMAT


def say(msg: str, is_main: bool = True) -> None:
    """A line on stderr that does not break the progress bar."""
    if is_main:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def reporting_callbacks(cfg: RunConfig, is_main: bool) -> CallbackList:
    """Rank 0's callbacks in the order they start (they close in reverse): W&B before run.json,
    which records its run id; the energy meter once the files are open; the banner last."""
    mfu = MfuCallback()
    if not is_main:
        return CallbackList([mfu])
    wandb = WandbCallback() if cfg.logging.wandb else None
    energy = EnergyCallback()
    found = [wandb, RunJsonCallback(wandb), MetricsCallback(), energy, mfu, ProgressCallback(mfu),
             SummaryCallback(energy)]
    return CallbackList([cb for cb in found if cb is not None])


def resumed_peak(run_dir: Path, peak: Peak, precision: str, step: int) -> Peak:
    """A resumed run divides by the measured peak it started with (per its run.json), so its MFU
    stays comparable (a configured peak still wins)."""
    try:
        before = parse_json((run_dir / "run.json").read_text())
        kept, kept_precision = Peak(float(before["peak_flops"]), str(before["peak_source"])), before["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return peak
    if step and kept.measured and peak.measured and kept_precision == precision and kept.flops > 0:
        return kept
    return peak


def previous_run(run_dir: Path) -> dict[str, Any]:
    """run.json as the last process of this run left it; empty when there is none."""
    try:
        before = parse_json((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return before if isinstance(before, dict) else {}


def line_due(line: dict[str, Any], every: int, max_steps: int) -> bool:
    """A metrics line is written every ``every`` steps, at the last step, and whenever it holds
    validation or downstream scores or a skipped step."""
    step = line["step"]
    return (step % every == 0 or "val_loss" in line or "skipped" in line
            or any(k.startswith("eval/") for k in line) or step == max_steps)


# -- files ------------------------------------------------------------------------------------------
class WandbCallback(Callback):
    """Weights & Biases (``wandb_log.py``): the run continues the W&B run of its run.json; it gets
    the lines metrics.jsonl gets."""

    def on_start(self, run: RunStart) -> None:
        from .wandb_log import WandbRun

        self.every, self.max_steps = run.cfg.logging.every_steps, run.cfg.training.max_steps
        self.wandb_run = WandbRun(run.cfg.logging, run.run_dir, resolved_config(run),
                                  previous_run(run.run_dir).get("wandb_run_id"))

    @property
    def run_id(self) -> str:
        return self.wandb_run.id

    def on_log(self, log: LogEvent) -> None:
        if line_due(log.line, self.every, self.max_steps):
            self.wandb_run.log(log.line)

    def on_close(self) -> None:
        self.wandb_run.finish()


class RunJsonCallback(Callback):
    """run.json: the run's identity and config, its layout, precision and MFU peak, its W&B run id
    (kept from the previous process when this one has no W&B)."""

    def __init__(self, wandb: WandbCallback | None = None):
        self.wandb = wandb

    def on_start(self, run: RunStart) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        wandb_id = self.wandb.run_id if self.wandb is not None else previous_run(run.run_dir).get("wandb_run_id")
        with atomic_file(run.run_dir / "run.json", "w") as fh:
            json.dump({"format": FORMAT, "identity": run.identity, "config": run.cfg.to_dict(),
                       "world_size": run.info.world_size, "precision": run.precision,
                       "peak_flops": run.peak.flops, "peak_source": run.peak.source,
                       "flops_per_token": run.flops_per_token,
                       **({"wandb_run_id": wandb_id} if wandb_id else {})}, fh, indent=1)


class MetricsCallback(Callback):
    """metrics.jsonl and TensorBoard (``metrics.MetricsWriter``): the lines that are due; a resumed
    run first drops the lines logged after its checkpoint."""

    def on_start(self, run: RunStart) -> None:
        self.every, self.max_steps = run.cfg.logging.every_steps, run.cfg.training.max_steps
        metrics.truncate_metrics(run.run_dir / "metrics.jsonl", run.step)
        self.writer = metrics.MetricsWriter(run.run_dir, run.cfg.logging.tensorboard, resume_step=run.step)

    def on_log(self, log: LogEvent) -> None:
        if line_due(log.line, self.every, self.max_steps):
            self.writer.write(log.line)

    def on_close(self) -> None:
        self.writer.close()  # TensorBoard flushed


class SummaryCallback(Callback):
    """summary.json: the run's figures from metrics.jsonl (``summary.py``) with the energy total;
    what ``train()`` returns."""

    def __init__(self, energy: EnergyCallback | None = None):
        self.energy = energy

    def on_start(self, run: RunStart) -> None:
        self.run_dir, self.peak_source = run.run_dir, run.peak.source

    def on_end(self) -> dict[str, Any]:
        from .summary import summarize

        summary = summarize(self.run_dir, self.energy.total if self.energy is not None else None, self.peak_source)
        with atomic_file(self.run_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1)
        return summary


def resolved_config(run: RunStart) -> dict[str, Any]:
    """The run config with the model section resolved in full and the figures derived from it."""
    config = run.cfg.to_dict()
    config["model"] = {**config["model"], **run.model_cfg.to_dict()}
    config["derived"] = {"seq_len": run.seq_len, "accumulation_steps": run.accum, "peak_lr": run.cfg.peak_lr,
                         "world_size": run.info.world_size, "precision": run.precision,
                         "flops_per_token": run.flops_per_token}
    return config


# -- measurements -----------------------------------------------------------------------------------
class EnergyCallback(Callback):
    """The energy meter (``compute/energy.py``): kWh and tCO2eq of this process plus those of the
    runs it resumed, on every line; ``total`` once closed (with the method, for the summary)."""

    def __init__(self) -> None:
        self.total: dict[str, Any] | None = None

    def on_start(self, run: RunStart) -> None:
        from ..compute.energy import EnergyMeter

        self.base = dict(run.energy)
        self.meter = EnergyMeter(str(run.info.device))
        self.meter.start()

    def on_step_end(self, log: LogEvent) -> None:
        e = self.meter.read()
        log.line["kwh"], log.line["tco2eq"] = (self.base[k] + e[k] for k in ("kwh", "tco2eq"))

    def on_close(self) -> None:
        energy = self.meter.stop()
        self.total = dict(energy, **{k: self.base[k] + energy[k] for k in ("kwh", "tco2eq")})


class MfuCallback(Callback):
    """MFU against the run's peak, in each step's line. A measured peak that gives an MFU above 1
    was measured while the machine was busy: it is measured again, now."""

    def on_start(self, run: RunStart) -> None:
        self.peak, self.precision = run.peak, run.precision
        self.flops_per_token, self.world_size = run.flops_per_token, run.info.world_size

    def on_step(self, step: StepEvent) -> None:
        step.line["mfu"] = self.mfu(step.tokens_per_s)

    def mfu(self, tokens_per_s: float) -> float:
        mfu = tokens_per_s * self.flops_per_token / (self.peak.flops * self.world_size)
        if mfu > 1.0 and self.peak.measured:
            self.peak = Peak(metrics.remeasure_cpu_peak(self.precision, self.peak.flops), self.peak.source)
            mfu = tokens_per_s * self.flops_per_token / (self.peak.flops * self.world_size)
        return mfu


# -- the console ------------------------------------------------------------------------------------
class ProgressCallback(Callback):
    """The banner, a skipped step or a loss spike, then the progress bar or plain lines."""

    def __init__(self, mfu: MfuCallback):
        self.mfu = mfu
        self.bar: Any = None  # a tqdm bar on a terminal
        self.last_val: float | None = None
        self.last_eval: str | None = None  # the main downstream score, as the progress line shows it

    def on_start(self, run: RunStart) -> None:
        t = run.cfg.training
        self.max_steps, self.every, self.batch_tokens = t.max_steps, run.cfg.logging.every_steps, t.global_batch_tokens
        self.start = self.mark = (run.step, run.elapsed_s)  # this process's start; the last plain line
        say(banner(run))
        if run.cfg.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=t.max_steps, initial=run.step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, desc="train")

    def on_step(self, step: StepEvent) -> None:
        loss, norm = step.loss, step.grad_norm
        if step.skipped:
            say(f"step {step.step}: non-finite loss ({loss}) or grad norm ({norm}); optimizer step skipped")
        elif step.spike_sigma is not None:
            say(f"step {step.step}: loss spike {loss:.4f} ({step.spike_sigma:.1f} sigma above its running mean)")

    def on_log(self, log: LogEvent) -> None:
        if "val_loss" in log.line:
            self.last_val = log.line["val_loss"]
        if any(k.startswith("eval/") for k in log.line):
            self.last_eval = log.eval_headline
        step = log.step.step
        if self.bar is not None:
            self._update_bar(log.line)
        elif step % self.every == 0 or step == self.max_steps:
            say(self.plain_line(log.step))

    def _update_bar(self, rec: dict[str, Any]) -> None:
        loss = rec["loss"] if rec["loss"] is not None else float("nan")
        post = {"loss": f"{loss:.3f}", "tok/s": f"{rec['tokens_per_s']:,.0f}", "mfu": f"{100 * rec['mfu']:.1f}%"}
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.3f}"
        if self.last_eval is not None:
            post["eval"] = self.last_eval
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def plain_line(self, step: StepEvent) -> str:
        """One line for a log file: this step's figures, tokens/s since the last line, and the ETA at
        this process's mean pace."""
        rec = step.line
        steps, seconds = step.step - self.mark[0], max(step.elapsed_s - self.mark[1], 1e-9)
        self.mark = (step.step, step.elapsed_s)
        tok_s = steps * self.batch_tokens / seconds
        pace = (step.elapsed_s - self.start[1]) / max(step.step - self.start[0], 1)
        parts = [f"step {step.step}/{self.max_steps}", f"loss {_num(rec['loss'], '.4f')}",
                 f"lr {rec['lr']:.2e}", f"grad norm {_num(rec['grad_norm'], '.3f')}", f"{tok_s:,.0f} tok/s",
                 f"MFU {100 * self.mfu.mfu(tok_s):.1f}%"]
        if self.last_val is not None:
            parts.append(f"val loss {self.last_val:.4f}")
        if self.last_eval is not None:
            parts.append(self.last_eval)
        parts.append(f"ETA {duration((self.max_steps - step.step) * pace)}")
        return "  ".join(parts)

    def on_close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def banner(run: RunStart) -> str:
    """The run in one line: model, batch and its layout, precision, FLOPs per token, the MFU peak."""
    cfg, tr, info = run.cfg, run.cfg.training, run.info
    name = f"from {cfg.checkpoint.init_from}" if cfg.checkpoint.init_from else cfg.model.get("preset", "custom")
    layout = f"{info.world_size} rank(s)" if info.tp == 1 else f"{info.dp_size} data-parallel group(s) of tp {info.tp}"
    return (f"training {name}: {run.n_params:,} params, seq {run.seq_len}, global "
            f"batch {tr.global_batch_tokens:,} tokens = {layout} x {tr.micro_batch_size} seq "
            f"x {run.accum} accumulation; {run.precision} compute{run.float8}, fp32 weights; "
            f"{run.flops_per_token / 1e6:.1f} MFLOP/token; MFU vs {run.peak.flops / 1e12:.3f} TFLOP/s per device "
            f"({run.peak.source})")


def _num(v: float | None, spec: str) -> str:
    return "nan" if v is None else format(v, spec)


def duration(seconds: float) -> str:
    """3h05m, 4m07s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
