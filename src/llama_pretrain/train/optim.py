"""AdamW with the paper's settings, its weight-decay groups, and the warm-up + cosine schedule.

Weight decay (0.1) reaches the 2-D weight matrices of the linear layers: the attention
projections ``wq/wk/wv/wo``, the feed-forward ``w1/w2/w3`` and the output head. It does not reach
the RMSNorm gains (1-D scales whose "natural" value is 1, not 0: decaying them pulls every
normalised activation towards zero) nor, by default, the token-embedding table: an embedding row
receives a gradient only when its token occurs, so decay would shrink the rows of rare tokens on
every step they are absent (the GPT-2/nanoGPT/Megatron practice; ``optimizer.decay_embeddings``
switches it on). A tied embedding (``model.tie_embeddings``) is the output head's matrix too and is
decayed as the head is: through the softmax every row gets a gradient on every step, so the
rare-token argument does not hold for it (nanoGPT and Hugging Face's Trainer decay it as well).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import UserError


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: decayed (linear weights [+ embeddings]) and not decayed (everything else);
    a tied embedding is the head's weight, so it is decayed (each parameter is in one group once)."""
    decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) or (decay_embeddings and isinstance(module, nn.Embedding)):
            decay_ids.add(id(module.weight))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def decayed_parameter_names(model: nn.Module, decay_embeddings: bool = False) -> list[str]:
    groups = param_groups(model, 1.0, decay_embeddings)
    ids = {id(p) for p in groups[0]["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def build_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-5,
                    weight_decay: float = 0.1, decay_embeddings: bool = False,
                    implementation: str = "auto") -> torch.optim.AdamW:
    device = next(model.parameters()).device
    kwargs: dict = {}
    if implementation == "auto":
        # The fused kernel makes one pass over each tensor: the fastest on CPU and GPU alike
        # (BENCHMARKS.md, section train, has the figures).
        implementation = "fused" if device.type in ("cuda", "cpu") else "foreach"
    if implementation == "fused":
        kwargs["fused"] = True
    elif implementation == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    groups = param_groups(model, weight_decay, decay_embeddings)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def lr_at(step: int, peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based; the last step is ``max_steps - 1``).

    Warm-up: ``peak * (step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first update
    is not wasted at LR 0 and the last warm-up step (``warmup_steps - 1``) is at the peak.
    Then cosine: with ``p = (step + 1 - warmup_steps) / (max_steps - warmup_steps)``,
    ``min + (peak - min) * (1 + cos(pi * p)) / 2``, which reaches ``min = min_lr_ratio * peak``
    exactly at the last step.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    min_lr = min_lr_ratio * peak_lr
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:
        return peak_lr
    progress = min(1.0, (step + 1 - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# -- the schedule of a run that resumes -------------------------------------------------------------
_PLAN_KEYS = ("peak_lr", "warmup_steps", "max_steps", "min_lr_ratio")


@dataclass(frozen=True)
class Schedule:
    """Warm-up + cosine over ``decay_end`` steps, then constant at the final LR up to ``max_steps``
    (``decay_end < max_steps`` only for a run extended with ``schedule.extend=constant``)."""
    peak_lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    decay_end: int

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.decay_end, self.min_lr_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        text = (f"peak {self.peak_lr:.3g}, warm-up {self.warmup_steps}, cosine to "
                f"{self.min_lr_ratio:g} x peak at step {self.decay_end}")
        if self.decay_end < self.max_steps:
            text += f", then {self.lr(self.decay_end - 1):.3g} to step {self.max_steps}"
        return text


def planned_schedule(peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Schedule:
    return Schedule(peak_lr, warmup_steps, max_steps, min_lr_ratio, decay_end=max_steps)


def saved_schedule(saved: dict[str, Any] | None) -> Schedule | None:
    """The schedule a checkpoint recorded; None for checkpoints that predate the record."""
    if not isinstance(saved, dict) or not all(k in saved for k in _PLAN_KEYS):
        return None
    return Schedule(float(saved["peak_lr"]), int(saved["warmup_steps"]), int(saved["max_steps"]),
                    float(saved["min_lr_ratio"]),
                    int(saved["decay_end"] if "decay_end" in saved else saved["max_steps"]))


def _plan(s: Schedule) -> dict[str, Any]:
    """What a config sets (``decay_end`` follows from how a run was extended)."""
    return {k: getattr(s, k) for k in _PLAN_KEYS}


def continue_schedule(saved: Schedule, planned: Schedule, extend: str, step: int) -> Schedule:
    """The schedule a run resumed at ``step`` follows. The saved one when the config did not change
    it; the config's when the change alters no LR still to come (e.g. a longer run that stays in
    warm-up); otherwise as ``extend`` says: refuse (a UserError naming both), constant (the saved
    cosine, then its final LR for the added steps) or replan (the config's, as if the run had
    started so: the LR jumps)."""
    if _plan(saved) == _plan(planned):
        return saved
    kept = replace(saved, max_steps=planned.max_steps)
    if extend == "replan" or all(kept.lr(s) == planned.lr(s) for s in range(step, planned.max_steps)):
        return planned
    both = f"the checkpoint's schedule is {saved.describe()}; this config's is {planned.describe()}"
    if extend == "constant":
        changed = [k for k in _PLAN_KEYS if k != "max_steps" and getattr(saved, k) != getattr(planned, k)]
        if changed or planned.max_steps < saved.max_steps:
            raise UserError(f"--schedule.extend=constant only adds steps at the final LR, but {both}; "
                            f"use --schedule.extend=replan to follow the new schedule")
        return kept
    raise UserError(f"the schedule changed: {both}; --schedule.extend=constant continues at the final LR "
                    f"for added steps, --schedule.extend=replan re-plans over the new settings")
