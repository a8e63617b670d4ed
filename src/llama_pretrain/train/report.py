"""What a training run tells its user: run.json, metrics.jsonl (+ TensorBoard), energy, progress.

Only rank 0 writes files and prints; every rank builds a ``Reporter`` so the loop has no
rank-dependent branches.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

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
        from tqdm import tqdm

        self.trainer, self.run_dir = trainer, Path(run_dir)
        cfg, state = trainer.cfg, trainer.state
        self.is_main = trainer.info.is_main
        self.peak = trainer.peak
        self.writer = self.meter = None
        self.energy_base = dict(state.energy)
        self.last_val: float | None = None
        if self.is_main:
            self._start_files()
            self._banner()
        self.bar = tqdm(total=cfg.training.max_steps, initial=state.step, unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=not (self.is_main and cfg.logging.progress), desc="train")

    def _start_files(self) -> None:
        t = self.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.run_dir / "run.json", "w") as fh:
            json.dump({"format": FORMAT, "identity": t.plan.identity, "config": t.cfg.to_dict(),
                       "world_size": t.info.world_size, "precision": t.state.precision,
                       "peak_flops": self.peak, "peak_source": t.peak_source,
                       "flops_per_token": t.flops_per_token}, fh, indent=1)
        metrics.truncate_metrics(self.run_dir / "metrics.jsonl", t.state.step)
        self.writer = metrics.MetricsWriter(self.run_dir, t.cfg.logging.tensorboard, resume_step=t.state.step)
        from ..compute.energy import EnergyMeter
        self.meter = EnergyMeter(str(t.info.device))
        self.meter.start()

    def _banner(self) -> None:
        t = self.trainer
        cfg, tr = t.cfg, t.cfg.training
        n_params = sum(p.numel() for p in t.model.parameters())
        say(f"training {cfg.model.get('preset', 'custom')}: {n_params:,} params, seq {t.plan.seq_len}, global "
            f"batch {tr.global_batch_tokens:,} tokens = {t.info.world_size} rank(s) x {tr.micro_batch_size} seq "
            f"x {t.plan.accum} accumulation; {t.state.precision} compute, fp32 weights; "
            f"{t.flops_per_token / 1e6:.1f} MFLOP/token; MFU vs {self.peak / 1e12:.3f} TFLOP/s per device "
            f"({t.peak_source})")

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
        if mfu > 1.0 and t.peak_source.startswith("measured"):
            # The start-up matmul ran while the machine was busy; measure the peak again, now.
            self.peak = max(self.peak, remeasure_peak(t.info.device, t.state.precision))
            mfu = tok_s * t.flops_per_token / (self.peak * t.info.world_size)
        return mfu

    def log(self, rec: dict[str, Any]) -> None:
        """Add energy to ``rec``, write it when due, and update the progress bar."""
        t, state = self.trainer, self.trainer.state
        if "val_loss" in rec:
            self.last_val = rec["val_loss"]
        if self.meter is not None:  # energy of this process plus that of the runs it resumed
            e = self.meter.read()
            state.energy = {k: self.energy_base[k] + e[k] for k in ("kwh", "tco2eq")}
            rec["kwh"], rec["tco2eq"] = state.energy["kwh"], state.energy["tco2eq"]
        due = (state.step % t.cfg.logging.every_steps == 0 or "val_loss" in rec or "skipped" in rec
               or state.step == t.cfg.training.max_steps)
        if self.writer is not None and due:
            self.writer.write(rec)
        self.bar.update(1)
        if not self.bar.disable:
            loss = rec["loss"] if rec["loss"] is not None else float("nan")
            post = {"loss": f"{loss:.3f}", "tok/s": f"{rec['tokens_per_s']:,.0f}",
                    "mfu": f"{100 * rec['mfu']:.1f}%"}
            if self.last_val is not None:
                post["val"] = f"{self.last_val:.3f}"
            self.bar.set_postfix(post, refresh=False)

    # -- the end -------------------------------------------------------------------------------
    def close(self) -> dict[str, Any] | None:
        """Stop the meter, close the files; on rank 0 the run summary (also written to summary.json)."""
        from .summary import summarize

        self.bar.close()
        if not self.is_main:
            return None
        energy = self.meter.stop() if self.meter is not None else None
        if energy is not None:
            energy = dict(energy, **{k: self.energy_base[k] + energy[k] for k in ("kwh", "tco2eq")})
        self.writer.close()
        summary = summarize(self.run_dir, energy, self.trainer.peak_source)
        with atomic_file(self.run_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1)
        return summary


def remeasure_peak(device, precision: str) -> float:
    """The CPU matmul peak measured again (without touching the training RNG stream)."""
    with torch.random.fork_rng(devices=[]):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return metrics.measure_matmul_peak(device, 1024, dtype, repeats=10)
