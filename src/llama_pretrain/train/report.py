"""What a training run tells its user: run.json, metrics.jsonl (+ TensorBoard, W&B), energy, progress.

Only rank 0 writes files and prints; every rank builds a ``Reporter`` so the loop has no
rank-dependent branches. Progress is a tqdm bar on a terminal; when stderr is a file (a batch job)
or ``logging.progress=false`` it is one plain line every ``logging.every_steps`` steps instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ..config import parse_json
from ..fsutil import atomic_file
from . import metrics
from .state import FORMAT


def say(msg: str, is_main: bool = True) -> None:
    """A line on stderr that does not break the progress bar."""
    if is_main:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


class Reporter:
    def __init__(self, trainer, run_dir: Path):
        self.trainer, self.run_dir = trainer, Path(run_dir)
        cfg, state = trainer.cfg, trainer.state
        self.is_main = trainer.info.is_main
        self.peak, self.peak_source = trainer.peak, trainer.peak_source
        self.writer = self.meter = self.bar = self.wandb = None
        self.energy_base = dict(state.energy)
        self.last_val: float | None = None
        self.last_eval: str | None = None  # the main downstream score, as the progress line shows it
        self.start = self.mark = (state.step, state.elapsed_s)  # this process's start; the last plain line
        if self.is_main:
            self._keep_resumed_peak()
            self._start_files()
            self._banner()
            if cfg.logging.progress and sys.stderr.isatty():
                from tqdm import tqdm
                self.bar = tqdm(total=cfg.training.max_steps, initial=state.step, unit="step", file=sys.stderr,
                                dynamic_ncols=True, desc="train")

    def _keep_resumed_peak(self) -> None:
        """A resumed run divides by the measured peak it started with, so its MFU stays comparable
        (a configured peak still wins)."""
        t = self.trainer
        try:
            before = parse_json((self.run_dir / "run.json").read_text())
            peak, source, precision = float(before["peak_flops"]), str(before["peak_source"]), before["precision"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        measured = source.startswith("measured") and self.peak_source.startswith("measured")
        if t.state.step and measured and precision == t.state.precision and peak > 0:
            self.peak, self.peak_source = peak, source

    def _start_files(self) -> None:
        t = self.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wandb_id = self._previous_run().get("wandb_run_id")
        if t.cfg.logging.wandb:
            from .wandb_log import WandbRun
            self.wandb = WandbRun(t.cfg.logging, self.run_dir, resolved_config(t), wandb_id)
            wandb_id = self.wandb.id
        with atomic_file(self.run_dir / "run.json", "w") as fh:
            json.dump({"format": FORMAT, "identity": t.plan.identity, "config": t.cfg.to_dict(),
                       "world_size": t.info.world_size, "precision": t.state.precision,
                       "peak_flops": self.peak, "peak_source": self.peak_source,
                       "flops_per_token": t.flops_per_token,
                       **({"wandb_run_id": wandb_id} if wandb_id else {})}, fh, indent=1)
        metrics.truncate_metrics(self.run_dir / "metrics.jsonl", t.state.step)
        self.writer = metrics.MetricsWriter(self.run_dir, t.cfg.logging.tensorboard, resume_step=t.state.step)
        from ..compute.energy import EnergyMeter
        self.meter = EnergyMeter(str(t.info.device))
        self.meter.start()

    def _previous_run(self) -> dict[str, Any]:
        """run.json as the last process of this run left it; empty when there is none."""
        try:
            before = parse_json((self.run_dir / "run.json").read_text())
        except (OSError, ValueError):
            return {}
        return before if isinstance(before, dict) else {}

    def _banner(self) -> None:
        t = self.trainer
        cfg, tr = t.cfg, t.cfg.training
        n_params = sum(p.numel() for p in t.model.parameters())
        name = f"from {cfg.checkpoint.init_from}" if cfg.checkpoint.init_from else cfg.model.get("preset", "custom")
        layout = f"{t.info.world_size} rank(s)" if t.info.tp == 1 else \
            f"{t.info.dp_size} data-parallel group(s) of tp {t.info.tp}"
        say(f"training {name}: {n_params:,} params, seq {t.plan.seq_len}, global "
            f"batch {tr.global_batch_tokens:,} tokens = {layout} x {tr.micro_batch_size} seq "
            f"x {t.plan.accum} accumulation; {t.state.precision} compute{self._float8()}, fp32 weights; "
            f"{t.flops_per_token / 1e6:.1f} MFLOP/token; MFU vs {self.peak / 1e12:.3f} TFLOP/s per device "
            f"({self.peak_source})")

    def _float8(self) -> str:
        from .parallelize import float8_summary

        return float8_summary(self.trainer.model, self.trainer.parallel)

    # -- per step ------------------------------------------------------------------------------
    def record(self, result) -> dict[str, Any]:
        """The metrics line of one optimizer step (``result``: the trainer's ``StepResult``)."""
        t, state = self.trainer, self.trainer.state
        tok_s = t.cfg.training.global_batch_tokens / result.seconds
        mfu = self._mfu(tok_s)
        loss, norm = result.loss, result.grad_norm
        rec: dict[str, Any] = {
            "step": state.step, "loss": loss if math.isfinite(loss) else None,
            "perplexity": math.exp(min(loss, 50.0)) if math.isfinite(loss) else None,
            "lr": result.lr, "grad_norm": norm if math.isfinite(norm) else None,
            "tokens_seen": state.tokens_seen, "tokens_per_s": tok_s, "mfu": mfu, "step_time_s": result.seconds,
            "elapsed_s": state.elapsed_s,
        }
        if result.skipped:
            rec["skipped"] = "non-finite loss or gradient"
            say(f"step {state.step}: non-finite loss ({loss}) or grad norm ({norm}); optimizer step skipped",
                self.is_main)
        elif result.spike_sigma is not None:
            rec["loss_spike_sigma"] = result.spike_sigma
            say(f"step {state.step}: loss spike {loss:.4f} ({result.spike_sigma:.1f} sigma above its running "
                f"mean)", self.is_main)
        return rec

    def _mfu(self, tok_s: float) -> float:
        t = self.trainer
        mfu = tok_s * t.flops_per_token / (self.peak * t.info.world_size)
        if mfu > 1.0 and self.peak_source.startswith("measured"):
            # The peak was measured while the machine was busy; measure it again, now.
            self.peak = metrics.remeasure_cpu_peak(t.state.precision, self.peak)
            mfu = tok_s * t.flops_per_token / (self.peak * t.info.world_size)
        return mfu

    def log(self, rec: dict[str, Any]) -> None:
        """Add energy to ``rec``, write it when due, and update the progress bar."""
        t, state = self.trainer, self.trainer.state
        if "val_loss" in rec:
            self.last_val = rec["val_loss"]
        scored = any(k.startswith("eval/") for k in rec)
        if scored:
            self.last_eval = self.trainer.downstream.headline(rec)
        if self.meter is not None:  # energy of this process plus that of the runs it resumed
            e = self.meter.read()
            state.energy = {k: self.energy_base[k] + e[k] for k in ("kwh", "tco2eq")}
            rec["kwh"], rec["tco2eq"] = state.energy["kwh"], state.energy["tco2eq"]
        due = (state.step % t.cfg.logging.every_steps == 0 or "val_loss" in rec or "skipped" in rec
               or scored or state.step == t.cfg.training.max_steps)
        if self.writer is not None and due:
            self.writer.write(rec)
        if self.wandb is not None and due:
            self.wandb.log(rec)
        if self.bar is not None:
            self._update_bar(rec)
        elif self.is_main and (state.step % t.cfg.logging.every_steps == 0 or state.step == t.cfg.training.max_steps):
            say(self.plain_line(rec))

    def _update_bar(self, rec: dict[str, Any]) -> None:
        loss = rec["loss"] if rec["loss"] is not None else float("nan")
        post = {"loss": f"{loss:.3f}", "tok/s": f"{rec['tokens_per_s']:,.0f}", "mfu": f"{100 * rec['mfu']:.1f}%"}
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.3f}"
        if self.last_eval is not None:
            post["eval"] = self.last_eval
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def plain_line(self, rec: dict[str, Any]) -> str:
        """One line for a log file: this step's figures, tokens/s since the last line, and the ETA at
        this process's mean pace."""
        t, state = self.trainer, self.trainer.state
        steps, seconds = state.step - self.mark[0], max(state.elapsed_s - self.mark[1], 1e-9)
        self.mark = (state.step, state.elapsed_s)
        tok_s = steps * t.cfg.training.global_batch_tokens / seconds
        pace = (state.elapsed_s - self.start[1]) / max(state.step - self.start[0], 1)
        parts = [f"step {state.step}/{t.cfg.training.max_steps}", f"loss {_num(rec['loss'], '.4f')}",
                 f"lr {rec['lr']:.2e}", f"grad norm {_num(rec['grad_norm'], '.3f')}", f"{tok_s:,.0f} tok/s",
                 f"MFU {100 * self._mfu(tok_s):.1f}%"]
        if self.last_val is not None:
            parts.append(f"val loss {self.last_val:.4f}")
        if self.last_eval is not None:
            parts.append(self.last_eval)
        parts.append(f"ETA {duration((t.cfg.training.max_steps - state.step) * pace)}")
        return "  ".join(parts)

    # -- the end -------------------------------------------------------------------------------
    def close_streams(self) -> dict[str, Any] | None:
        """Close the progress bar, the metrics files (TensorBoard flushed) and the energy meter; the
        run's total energy on rank 0. Also what a preempted run does before it exits."""
        if self.bar is not None:
            self.bar.close()
        if not self.is_main:
            return None
        energy = self.meter.stop() if self.meter is not None else None
        if energy is not None:
            energy = dict(energy, **{k: self.energy_base[k] + energy[k] for k in ("kwh", "tco2eq")})
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        return energy

    def close(self) -> dict[str, Any] | None:
        """Close the streams; on rank 0 the run summary (also written to summary.json)."""
        from .summary import summarize

        energy = self.close_streams()
        if not self.is_main:
            return None
        summary = summarize(self.run_dir, energy, self.peak_source)
        with atomic_file(self.run_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1)
        return summary


def resolved_config(trainer) -> dict[str, Any]:
    """The run config with the model section resolved in full and the figures derived from it."""
    cfg, plan = trainer.cfg, trainer.plan
    config = cfg.to_dict()
    config["model"] = {**config["model"], **plan.model_cfg.to_dict()}
    config["derived"] = {"seq_len": plan.seq_len, "accumulation_steps": plan.accum, "peak_lr": cfg.peak_lr,
                         "world_size": trainer.info.world_size, "precision": trainer.state.precision,
                         "flops_per_token": trainer.flops_per_token}
    return config


def _num(v: float | None, spec: str) -> str:
    return "nan" if v is None else format(v, spec)


def duration(seconds: float) -> str:
    """3h05m, 4m07s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
