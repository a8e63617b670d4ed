"""``TrainState``: everything besides the tensors that a resumed run needs to continue bit for bit.

It is saved as one JSON object (``trainer_state.json`` in each checkpoint) and restored as one.
Per-rank parts (the loader position and the RNG states) are gathered from every rank on save; a
run resumed at another world size restarts each rank from rank 0's RNG and loader position. The
layout that wrote it (``world_size``, ``tp``, ``data_parallel``) is recorded for the user; the
tensors themselves reshard to any layout (DCP), and the loader position is global.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.loader import TokenLoader
from .guards import NonFiniteGuard, SpikeDetector
from .distributed import gather_object

FORMAT = "llama-pretrain-trainer/1"


@dataclass
class TrainState:
    loader: TokenLoader
    """The training data loader (its position is part of the state)."""
    spikes: SpikeDetector
    nonfinite: NonFiniteGuard
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    """Training wall time over this run and every run it resumed."""
    energy: dict[str, float] = field(default_factory=lambda: {"kwh": 0.0, "tco2eq": 0.0})
    """Energy and carbon so far, over this run and every run it resumed."""
    schedule: dict[str, float] = field(default_factory=dict)
    """The learning-rate schedule (``optim.Schedule``: peak_lr, warmup_steps, max_steps, min_lr_ratio,
    decay_end) and last_lr; a resumed run keeps it unless told how to change it (schedule.extend)."""
    precision: str = "fp32"
    """The compute precision the run chose (a resumed run keeps it)."""
    tp: int = 1
    """This process's tensor-parallel degree (recorded on save; not restored: a run may resume on
    another layout)."""

    def state_dict(self) -> dict[str, Any]:
        """The JSON-able state; a collective under torchrun (every rank calls it)."""
        loaders = gather_object(self.loader.state_dict())
        return {
            "format": FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s, "energy": dict(self.energy),
            "loader": loaders, "rng": gather_object(rng_state()),
            "world_size": len(loaders), "tp": self.tp, "data_parallel": len(loaders) // self.tp,
            "precision": self.precision,
            "schedule": dict(self.schedule),
            "guards": {"spike": self.spikes.state_dict(), "nonfinite_in_row": self.nonfinite.in_row},
        }

    def load_state_dict(self, state: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        """Restore from ``state`` (as saved by any world size) into rank ``rank``'s parts."""
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.energy = dict(state.get("energy") or {"kwh": 0.0, "tco2eq": 0.0})
        self.schedule = dict(state.get("schedule") or {})
        self.precision = state.get("precision", self.precision)
        loaders, rngs = state["loader"], state["rng"]
        mine = rank if len(loaders) == world_size else 0
        self.loader.load_state_dict(loaders[mine])
        set_rng_state(rngs[mine])
        self.spikes.load_state_dict(state["guards"]["spike"])
        self.nonfinite.in_row = int(state["guards"]["nonfinite_in_row"])


# -- RNG state as JSON ------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
