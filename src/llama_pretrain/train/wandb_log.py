"""Weights & Biases: the scalars of metrics.jsonl and the resolved config, one W&B run per run dir.

On with ``logging.wandb = true`` (``pip install 'llama-pretrain[wandb]'``); ``logging.wandb_project``,
``wandb_name`` (default: the run dir's name) and ``wandb_entity`` say where it goes. The W&B run id
is kept in run.json, so a resumed run continues the same W&B run. W&B's own settings apply as usual:
``WANDB_MODE=offline`` writes RUN_DIR/wandb/offline-run-* for a later ``wandb sync``. Rank 0 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError


def check_available() -> None:
    """A one-line error, before anything is written, when logging.wandb is on without the package."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("logging.wandb = true needs the wandb package: pip install 'llama-pretrain[wandb]'") from None


class WandbRun:
    """One W&B run: started (or continued, by ``run_id``) with the config, fed the metrics lines."""

    def __init__(self, logging_cfg, run_dir: Path, config: dict[str, Any], run_id: str | None):
        import wandb

        self.run = wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity or None,
                              name=logging_cfg.wandb_name or run_dir.resolve().name,
                              id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, rec: dict[str, Any]) -> None:
        """A metrics line's numbers at its step (text such as a skip reason stays in metrics.jsonl).
        Steps the W&B run already has (a resumed run repeats, bit for bit, those after its
        checkpoint) are not sent again: W&B refuses a step below its last."""
        if rec["step"] < self.run.step:
            return
        numbers = {k: v for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(numbers, step=rec["step"])

    def finish(self) -> None:
        self.run.finish()
