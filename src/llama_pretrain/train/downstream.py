"""Downstream evaluation inside training: the tasks of `llama-pretrain eval`, on the live weights.

``eval.tasks`` are scored every ``eval.every_steps`` steps and at the last step by the same harness
(``CausalLM`` over ``NativeBackend``, batch size 16, fp32 as trained) and the same task code
(``eval.evaluator.evaluate``) as `llama-pretrain eval`, so the score logged at the last step equals
``llama-pretrain eval RUN/final`` with the same tasks, limit and shots. Rank 0 scores; under DDP its
replica, under FSDP a full copy that every rank helps gather (a collective), so every rank calls
``run``. Results become ``eval/<task>/<metric>`` keys of the step's metrics line.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UserError
from .distributed import barrier
from .parallelize import sharded

BATCH_SIZE = 16  # `llama-pretrain eval`'s default, so the last step's score matches it exactly


class Downstream:
    """The configured tasks and how to score them; ``enabled`` is False without ``eval.tasks``."""

    def __init__(self, cfg, task_ids: list[str], tokenizer_model: Path | None, info):
        self.section, self.task_ids, self.info = cfg.eval, task_ids, info
        self.max_steps = cfg.training.max_steps
        self.model_cfg, self.tokenizer_model = cfg.model_config(), tokenizer_model
        self.primary: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.task_ids)

    def due(self, step: int) -> bool:
        every = self.section.every_steps
        return self.enabled and (step == self.max_steps or bool(every and step % every == 0))

    def run(self, model: torch.nn.Module) -> dict[str, float]:
        """Score the tasks on ``model`` (the wrapped training model); rank 0 returns the metrics,
        the other ranks {}. The model is back in training mode afterwards."""
        live = self._weights_for_rank0(model)
        metrics: dict[str, float] = {}
        if live is not None:
            try:
                metrics = self._score(live)
            finally:
                model.train()
        barrier()
        return metrics

    def _weights_for_rank0(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The Transformer rank 0 scores: DDP's replica, or under FSDP or tensor parallelism a copy of
        the gathered weights (every rank takes part in the gather)."""
        if not sharded(model):
            return getattr(model, "module", model) if self.info.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.info.is_main:
            return None
        from ..model import Transformer
        with torch.device(self.info.device):
            copy = Transformer(self.model_cfg)
        copy.load_state_dict(full)
        return copy

    @torch.no_grad()
    def _score(self, transformer: torch.nn.Module) -> dict[str, float]:
        from ..eval.evaluator import evaluate
        from ..eval.harness import CausalLM, NativeBackend
        from ..eval.tokenization import load_tokenizer
        from .report import say

        if self.tokenizer_model is None:  # check_eval_data refuses this before the run
            raise UserError("eval.tasks needs the tokenizer the data was made with; set data.tokenizer")
        lm = CausalLM(NativeBackend(transformer), load_tokenizer(self.tokenizer_model), batch_size=BATCH_SIZE)
        s = self.section
        doc = evaluate(lm, self.task_ids, data_dir=s.data_dir or None, shots=s.shots, limit=s.limit,
                       progress=False, log=lambda msg: say(f"eval {msg}"))
        out = {}
        for tid, result in doc["results"].items():
            self.primary[tid] = result["primary"]
            for name in result["metrics"] + [f"{result['primary']}_stderr"]:
                if math.isfinite(result[name]):
                    out[f"eval/{tid}/{name}"] = result[name]
        return out

    def headline(self, rec: dict) -> str | None:
        """The main score of a metrics line for the progress line: the task's primary metric, or
        the mean of the primaries over several tasks; None when the line has no scores."""
        scores = {t: rec[f"eval/{t}/{m}"] for t, m in self.primary.items() if f"eval/{t}/{m}" in rec}
        if not scores:
            return None
        if len(scores) == 1:
            (tid, value), = scores.items()
            return f"eval {tid}/{self.primary[tid]} {100 * value:.1f}%"
        return f"eval mean {100 * sum(scores.values()) / len(scores):.1f}% ({len(scores)} tasks)"


def check_eval_data(cfg, task_ids: list[str], tokenizer_model: Path | None) -> None:
    """Before anything is written: every task's records load (locally, or downloaded by
    `datasets`), generated code could run sandboxed, and the dataset's tokenizer is known."""
    if not task_ids:
        return
    if tokenizer_model is None:
        raise UserError(f"eval.tasks needs the tokenizer {', '.join(cfg.data.dirs)} was made with; "
                        f"set data.tokenizer")
    from ..eval.evaluator import task_records
    from ..eval.tasks import TASKS

    data_dir = cfg.eval.data_dir or None
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"eval.data_dir {data_dir} is not a directory")
    for tid in task_ids:
        records, source = task_records(TASKS[tid], data_dir)
        if not records:
            raise UserError(f"eval.tasks: task {tid} has no records in {source}")
    code = [t for t in task_ids if TASKS[t].kind == "code"]
    if code:
        from ..eval.sandbox import require_isolation
        try:
            require_isolation(False)
        except UserError as e:  # no --allow-unsandboxed inside training: that choice is eval's
            raise UserError(f"eval.tasks {', '.join(code)}: {e} (with `llama-pretrain eval`)") from None
