"""Guardrails: skip non-finite steps, stop after too many in a row, and flag loss spikes."""

from __future__ import annotations

import math

from ..errors import UserError


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises once ``limit`` happen in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_row = 0
        self.total = 0

    def record(self, step: int, nonfinite: bool) -> None:
        if not nonfinite:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.limit:
            raise UserError(f"training stopped at step {step}: {self.in_row} consecutive steps with a "
                            f"non-finite loss or gradient (training.max_nonfinite_in_row={self.limit}); "
                            f"lower optimizer.lr or resume from an earlier checkpoint")


class SpikeDetector:
    """Flags a loss more than ``sigma`` standard deviations above its exponential moving average.

    The mean and variance are exponentially weighted (``beta``); the first ``warmup`` losses only
    feed the statistics, since early training falls too fast for "normal" to mean anything.
    """

    def __init__(self, sigma: float, beta: float = 0.98, warmup: int = 20):
        self.sigma, self.beta, self.warmup = sigma, beta, warmup
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def update(self, loss: float) -> float | None:
        """Feed one loss; returns its z-score when it is a spike, else None."""
        if not math.isfinite(loss):
            return None
        z = None
        if self.n >= self.warmup:
            std = math.sqrt(max(self.var, 1e-12))
            score = (loss - self.mean) / std
            if score > self.sigma:
                z = score
        if self.n == 0:
            self.mean = loss
        else:
            d = loss - self.mean
            self.mean += (1 - self.beta) * d
            self.var = self.beta * (self.var + (1 - self.beta) * d * d)
        self.n += 1
        return z

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.n = float(d["mean"]), float(d["var"]), int(d["n"])
