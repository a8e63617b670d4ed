"""The training loop: ``train(cfg, run_dir)``, the same in one process and under torchrun.

It reads as five parts:

1. ``preflight``  every check (config, dataset, run dir, checkpoints, schedule) before anything is
                  written, and the run dir's lock (one job per run dir, ``runlock.py``);
2. ``Trainer``    builds the model, applies parallelism, builds the optimizer and the ``TrainState``;
3. ``resume``     loads the latest valid checkpoint, when there is one;
4. the loop       ``train_step`` / ``validate`` / downstream eval (``downstream.py``) /
                  ``save_checkpoint``, reported through callbacks (``callbacks.py``: the events;
                  ``report.py``: one callback per report); a stop signal checkpoints the last step
                  and ends it (``preemption.py``);
5. ``finish``     exports the final weights and writes the summary.

Per optimizer step each rank runs ``accumulation_steps`` micro-batches of ``micro_batch_size``
sequences (so that micro-batch x accumulation x data-parallel size x seq_len =
``global_batch_tokens``; the data-parallel size is the world size / ``parallel.tp``, since the
ranks of one tensor-parallel group share their rows),
averages the loss over them, clips the global gradient norm, and steps AdamW at the scheduled LR.
Everything a resumed run needs to continue bit for bit is in each checkpoint (weights, AdamW
moments and the ``TrainState``); metrics logged after the checkpoint a run resumes from are
dropped from ``metrics.jsonl`` so every step appears once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..compute.flops import flops_per_token
from ..config import ModelConfig, parse_json
from ..data.loader import TokenLoader
from ..data.shards import check_token_ids, datasets_tokenizer, read_manifest
from ..errors import UserError
from ..interop import training_checkpoint as ckpt_files
from ..losses import loss_parallel_context
from ..model import Transformer
from . import metrics
from .callbacks import CallbackList, LogEvent, Peak, RunStart, StepEvent
from .checkpoint import restore_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier, gather_object, init_distributed
from .downstream import Downstream, check_eval_data
from .guards import NonFiniteGuard, SpikeDetector
from .init_from import check_tokenizer, load_weights
from .optim import Schedule, build_optimizer, continue_schedule, planned_schedule, saved_schedule, set_lr
from .parallelize import (check_parallel, eager_no_grad, float8_summary, grad_sync, parallelize,
                          precompute_float8_scales)
from .preemption import Preempted, StopSignals
from .report import reporting_callbacks, resumed_peak, say
from .runlock import RunLock
from .state import TrainState
from .wandb_log import check_available as check_wandb_available


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; resumes automatically from its latest valid checkpoint
    (``resume=True`` requires one). Returns the run summary (also written to summary.json). One job
    at a time holds the run dir; SIGTERM/SIGINT/SIGUSR1 checkpoint the step in progress and raise
    ``Preempted``."""
    info = init_distributed(cfg.training.device)
    with RunLock(Path(run_dir), info) as lock, StopSignals(info.is_main) as signals:
        plan = preflight(cfg, Path(run_dir), info, resume, lock)
        trainer = Trainer(cfg, plan, info)
        trainer.resume()
        callbacks = reporting_callbacks(cfg, info.is_main)
        callbacks.on_start(run_start(trainer))
        trainer.start_clock()
        while trainer.state.step < cfg.training.max_steps:
            stop_if_signalled(trainer, callbacks, signals)
            step = trainer.train_step()
            callbacks.on_step(step)
            log = evaluate(trainer, step)
            callbacks.on_step_end(log)
            callbacks.on_log(log)
            if "kwh" in step.line:  # rank 0's energy so far, which its checkpoints keep
                trainer.state.energy = {k: step.line[k] for k in ("kwh", "tco2eq")}
            trainer.state.nonfinite.record(step.step, step.skipped)  # raises after K in a row
            if trainer.checkpoint_due():
                trainer.save_checkpoint()
        return finish(trainer, callbacks)


def run_start(trainer: "Trainer") -> RunStart:
    """What the reports start from; rank 0 keeps the measured peak its run started with
    (``report.resumed_peak``)."""
    plan, info, state = trainer.plan, trainer.info, trainer.state
    peak = resumed_peak(plan.run_dir, trainer.peak, state.precision, state.step) if info.is_main else trainer.peak
    return RunStart(run_dir=plan.run_dir, cfg=trainer.cfg, info=info, identity=plan.identity,
                    model_cfg=plan.model_cfg, seq_len=plan.seq_len, accum=plan.accum, precision=state.precision,
                    peak=peak, flops_per_token=trainer.flops_per_token,
                    n_params=sum(p.numel() for p in trainer.model.parameters()),
                    float8=float8_summary(trainer.model, trainer.parallel),
                    step=state.step, elapsed_s=state.elapsed_s, energy=dict(state.energy))


def evaluate(trainer: "Trainer", step: StepEvent) -> LogEvent:
    """Validation and downstream scores, when due, into the step's metrics line."""
    if trainer.validation_due():
        step.line.update(trainer.validate())
    headline = None
    if trainer.downstream.due(step.step):
        step.line.update(trainer.downstream.run(trainer.model))
        headline = trainer.downstream.headline(step.line)
    return LogEvent(step, headline)


def stop_if_signalled(trainer: "Trainer", callbacks: CallbackList, signals: StopSignals) -> None:
    """Between steps, once every rank knows of a stop signal: checkpoint the last finished step
    (unless it has one already), close the reports and raise ``Preempted``."""
    signum = signals.agreed()
    if signum is None:
        return
    trained = trainer.state.step > trainer.saved_step
    if trained:
        trainer.save_checkpoint()
    callbacks.on_close()
    raise Preempted(signum, trainer.state.step, trainer.last_checkpoint, trained)


# -- 1. preflight ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What preflight found: the run's shape, its data, and where it resumes from. Built once, by
    ``preflight``, and fixed from then on."""
    run_dir: Path
    model_cfg: ModelConfig
    seq_len: int
    accum: int
    loader: TokenLoader
    validate: bool
    identity: dict[str, Any]
    tokenizer_model: Path | None
    schedule: Schedule
    start_ckpt: Path | None = None
    start_state: dict[str, Any] | None = None
    init_from: str = ""
    """checkpoint.init_from when this run starts from it; empty when it resumes from its own checkpoint."""
    eval_tasks: tuple[str, ...] = ()
    """``eval.tasks`` resolved to task ids, their data checked."""


def preflight(cfg: RunConfig, run_dir: Path, info: DistInfo, resume: bool, lock: RunLock) -> Plan:
    """Every check before anything is written (the run dir's lock first: another job's checkpoints
    are not read while it writes them); a ``UserError`` names the first problem."""
    t = cfg.training
    model_cfg = cfg.model_config()
    check_parallel(cfg, info, model_cfg)
    accum = cfg.accumulation_steps(info.world_size)
    dirs = cfg.data.dirs
    if not dirs:
        raise UserError("data.path is not set: point it at a prepared dataset (llama-pretrain data prepare)")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory")
    refuse_model_dir(run_dir)
    # Split by data-parallel group: the tp ranks of one group read the same rows.
    loader = TokenLoader(dirs, "train", t.micro_batch_size, cfg.seq_len, t.seed, info.dp_rank, info.dp_size)
    shown = ", ".join(dirs)
    if cfg.logging.wandb:
        check_wandb_available()
    if cfg.checkpoint.init_from:  # its tokenizer and vocabulary, before the generic vocabulary check
        check_tokenizer(cfg.checkpoint.init_from, model_cfg.vocab_size, loader.tokenizer_sha256,
                        loader.vocab_size, shown)
    if loader.vocab_size != model_cfg.vocab_size:
        raise UserError(f"the dataset {shown} was tokenized with a vocabulary of {loader.vocab_size}, "
                        f"the model has vocab_size {model_cfg.vocab_size}; set model.vocab_size or re-tokenize")
    validate = bool(cfg.data.val_split) and t.eval_every_steps > 0
    check_data_dirs(dirs, ["train"] + ([cfg.data.val_split] if validate else []), model_cfg.vocab_size)
    identity = run_identity(model_cfg, loader)
    tokenizer_model = datasets_tokenizer(dirs, cfg.data.tokenizer or None)
    eval_tasks = tuple(cfg.eval_task_ids())
    check_eval_data(cfg, list(eval_tasks), tokenizer_model)
    lock.acquire()
    check_run_dir(run_dir, identity)
    start_ckpt, start_state = find_start(run_dir, identity, cfg, info, resume)
    return Plan(run_dir, model_cfg, cfg.seq_len, accum, loader, validate, identity, tokenizer_model,
                schedule=choose_schedule(cfg, start_ckpt, start_state, info), start_ckpt=start_ckpt,
                start_state=start_state, eval_tasks=eval_tasks,
                init_from="" if start_ckpt else cfg.checkpoint.init_from)  # never again once it has checkpoints


def check_data_dirs(dirs: list[str], splits: list[str], vocab_size: int) -> None:
    """Each data dir has the splits, and no token id outside the vocabulary (a bad id would fail mid-run)."""
    for d in dirs:
        for split in splits[1:]:  # the loader has opened "train" already
            if split not in read_manifest(d).get("splits", {}):
                raise UserError(f"{d} has no {split!r} split; set data.val_split=\"\" to train without validation")
        for split in splits:
            check_token_ids(d, split, vocab_size)


# What a model or checkpoint dir holds at its top level and a run dir never does.
MODEL_FILES = ("config.json", "params.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", ckpt_files.STATE_FILE, ".metadata")


def refuse_model_dir(run_dir: Path) -> None:
    """A model or checkpoint dir (RUN/final, a Hugging Face or Meta dir, RUN/checkpoints or one of
    its step-N) is not a run dir: training into it would mix a run's files into the model's."""
    if not run_dir.is_dir() or (run_dir / "run.json").is_file() or (run_dir / "checkpoints").is_dir():
        return  # a new run dir, or a run dir already
    found = next((n for n in MODEL_FILES if (run_dir / n).exists()), None)
    found = found or next((p.name for p in sorted(run_dir.glob("consolidated.*.pth"))), None)
    found = found or next((p.name for p in sorted(run_dir.glob("step-*")) if p.is_dir()), None)
    if found:
        raise UserError(f"--run-dir {run_dir} holds {found}: it is a model or checkpoint directory, not a "
                        f"run dir; use another --run-dir (a new or empty one, or an earlier run's)")


def run_identity(model_cfg: ModelConfig, loader: TokenLoader) -> dict[str, Any]:
    """What makes two runs 'the same run' for resuming: the model and the training data."""
    return {"model": model_cfg.to_dict(),
            "data": {"tokenizer_sha256": loader.tokenizer_sha256, "train_tokens": loader.num_tokens}}


def identity_diff(a: dict, b: dict) -> str | None:
    """The first field in which two run identities differ, as a phrase; None when they agree."""
    for part in ("model", "data"):
        x, y = a.get(part, {}), b.get(part, {})
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                return f"{part}.{key} is {x.get(key)!r} there, {y.get(key)!r} here"
    return None


def check_run_dir(run_dir: Path, identity: dict[str, Any]) -> None:
    """A run dir that holds another run (per its run.json) is refused."""
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        return
    try:
        previous = parse_json(run_file.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run_file} is unreadable; use another --run-dir") from None
    diff = identity_diff(previous, identity)
    if diff:
        raise UserError(f"{run_dir} holds another run ({diff}); use another --run-dir")


def find_start(run_dir: Path, identity: dict[str, Any], cfg: RunConfig, info: DistInfo,
               resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest valid checkpoint of this same run and its trainer state; (None, None) for a new run."""
    root = run_dir / "checkpoints"
    if not ckpt_files.list_checkpoints(root):
        if resume:
            raise UserError(f"--resume: no checkpoint in {root}")
        return None, None
    ckpt = ckpt_files.latest_valid(root, warn=lambda m: say(m, info.is_main))
    if ckpt is None:
        raise UserError(f"every checkpoint in {root} is damaged; nothing to resume from")
    state = ckpt_files.read_trainer_state(ckpt)
    diff = identity_diff(state.get("identity", {}), identity)
    if diff:
        raise UserError(f"{run_dir} holds checkpoints of another run ({diff}); use another --run-dir")
    if int(state.get("step", 0)) > cfg.training.max_steps:  # would export the later weights as this run's
        raise UserError(f"{ckpt} is at step {state['step']}, past training.max_steps="
                        f"{cfg.training.max_steps}; use another --run-dir (to train on, raise max_steps "
                        f"and choose --schedule.extend=constant or replan)")
    return ckpt, state


def choose_schedule(cfg: RunConfig, start_ckpt: Path | None, start_state: dict[str, Any] | None,
                    info: DistInfo) -> Schedule:
    """The config's schedule for a new run; for a resumed one, the checkpoint's unless the config
    changed it, and then as ``schedule.extend`` says (train/optim.py, ``continue_schedule``)."""
    s = cfg.schedule
    planned = planned_schedule(cfg.peak_lr, s.warmup_steps, cfg.training.max_steps, s.min_lr_ratio)
    if start_state is None:
        return planned
    saved = saved_schedule(start_state.get("schedule"))
    if saved is not None:
        return continue_schedule(saved, planned, s.extend, int(start_state["step"]))
    if s.extend == "constant":
        raise UserError(f"{start_ckpt} does not record its LR schedule, so --schedule.extend=constant "
                        f"cannot know its final LR; use --schedule.extend=replan")
    say(f"warning: {start_ckpt} does not record its LR schedule; following this config's "
        f"({planned.describe()})", info.is_main)
    return planned


# -- 2.-4. the trainer ----------------------------------------------------------------------------
def choose_precision(cfg: RunConfig, plan: Plan, info: DistInfo) -> tuple[str, Peak]:
    """bf16 or fp32, and the peak FLOP/s for MFU; every rank follows rank 0's (timing-based) choice."""
    requested = cfg.parallel.mixed_precision
    if requested == "auto" and plan.start_state is not None:  # a resumed run keeps its choice
        requested = plan.start_state.get("precision", "auto")
    device, configured = info.device, cfg.logging.peak_flops
    precision, flops, source = metrics.resolve_precision(device, requested, configured)
    chosen = gather_object(precision)[0]
    if chosen != precision:
        precision, flops, source = metrics.resolve_precision(device, chosen, configured)
    return precision, Peak(flops, source)


# training.fused_loss -> the model's chunked_loss
_CHUNKED_LOSS: dict[str, bool | Literal["head"] | None] = {"auto": None, "head": "head", "on": True, "off": False}


class Trainer:
    """The model, its optimizer and the ``TrainState``, and the operations of the loop."""

    def __init__(self, cfg: RunConfig, plan: Plan, info: DistInfo):
        self.cfg, self.plan, self.info = cfg, plan, info
        t = cfg.training
        torch.manual_seed(t.seed)
        precision, self.peak = choose_precision(cfg, plan, info)
        with torch.device(info.device):
            model = Transformer(plan.model_cfg)
        if plan.init_from:  # before parallelize, so DDP broadcasts and FSDP shards these weights
            fmt = load_weights(model, plan.init_from, plan.model_cfg)
            say(f"starting from {plan.init_from} ({fmt} weights) with a fresh optimizer and schedule", info.is_main)
        self.parallel = dataclasses.replace(cfg.parallel, mixed_precision=precision)
        self.model = parallelize(model, self.parallel, info)
        o = cfg.optimizer
        self.optimizer = build_optimizer(self.model, cfg.peak_lr, (o.beta1, o.beta2), o.eps, o.weight_decay,
                                         o.decay_embeddings, o.implementation)
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        # FSDP's mixed-precision policy casts parameters itself; otherwise autocast does (fp32 masters).
        # (With tp > 1 and one data-parallel group there is no FSDP: ``parallelize``.)
        self.autocast = precision == "bf16" and not hasattr(self.model, "set_requires_gradient_sync")
        self.tensor_parallel = info.tp > 1
        self.chunked_loss = _CHUNKED_LOSS[t.fused_loss]
        self.flops_per_token = flops_per_token(plan.model_cfg, plan.seq_len)
        self.state = TrainState(loader=plan.loader, spikes=SpikeDetector(t.spike_sigma),
                                nonfinite=NonFiniteGuard(t.max_nonfinite_in_row), precision=precision,
                                schedule=plan.schedule.to_dict(), tp=info.tp)
        self.downstream = Downstream(cfg, list(plan.eval_tasks), plan.tokenizer_model, info)
        self.last_checkpoint: Path | None = None
        self.saved_step = 0
        self._elapsed_base, self._t_start = 0.0, time.perf_counter()

    def start_clock(self) -> None:
        """Training time counts from here (after build, resume and the reports' start-up)."""
        self._elapsed_base, self._t_start = self.state.elapsed_s, time.perf_counter()

    def resume(self) -> None:
        """Load the checkpoint preflight found (weights, optimizer moments, ``TrainState``)."""
        ckpt, saved = self.plan.start_ckpt, self.plan.start_state
        if ckpt is None or saved is None:  # a new run (find_start gives both or neither)
            return
        restore_checkpoint(ckpt, self.model, self.optimizer)
        precision = self.state.precision  # chosen at build (an explicit setting may differ from the saved one)
        self.state.load_state_dict(saved, self.info.rank, self.info.world_size)
        self.state.precision = precision
        self.state.schedule.update(self.plan.schedule.to_dict())  # as preflight chose; last_lr kept
        self.last_checkpoint, self.saved_step = ckpt, self.state.step
        ranks, tp = int(saved.get("world_size", 1)), int(saved.get("tp", 1))
        say(f"resuming from {ckpt} (step {self.state.step}, {self.state.tokens_seen:,} tokens; written by "
            f"{ranks} rank(s) as dp {max(1, ranks // tp)} x tp {tp}, now dp {self.info.dp_size} x tp "
            f"{self.info.tp})", self.info.is_main)

    def lr(self, step: int) -> float:
        return self.plan.schedule.lr(step)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor,
             chunked: bool | Literal["head"] | None) -> torch.Tensor:
        """The training loss: the wrapped model's own loss path, so DDP/FSDP hooks run. Under tensor
        parallelism it is the vocabulary-parallel loss (``losses.py``), a plain scalar on every rank."""
        ctx = (torch.autocast(self.info.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            return self.model(inputs, targets, chunked_loss=chunked)

    def train_step(self) -> StepEvent:
        """One optimizer step over the global batch: accumulate, check, clip, step; its figures."""
        t, state = self.cfg.training, self.state
        t0 = time.perf_counter()
        lr = self.lr(state.step)
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.info.device)
        for micro in range(self.plan.accum):
            batch = next(state.loader).to(self.info.device, non_blocking=True)
            # loss_parallel (tp > 1) must cover the loss's backward as well as its forward.
            with grad_sync(self.model, micro == self.plan.accum - 1), loss_parallel_context(self.tensor_parallel):
                loss = self.loss(batch[:, :-1], batch[:, 1:], self.chunked_loss)
                if t.debug_nan_at_step == state.step + 1:
                    loss = loss * float("nan")
                (loss / self.plan.accum).backward()
            loss_sum += loss.detach()
        loss_val = all_reduce_mean(loss_sum / self.plan.accum)
        grad_norm = global_grad_norm(self.params)
        skipped = all_reduce_max(float(not (math.isfinite(loss_val) and math.isfinite(grad_norm)))) > 0
        if not skipped:  # every rank agrees to skip, or none does
            clip_gradients_(self.params, grad_norm, self.cfg.optimizer.grad_clip)
            self.optimizer.step()
            precompute_float8_scales(self.model, self.parallel)
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += t.global_batch_tokens
        state.schedule["last_lr"] = lr
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        seconds = time.perf_counter() - t0
        state.elapsed_s = self._elapsed_base + time.perf_counter() - self._t_start
        spike = None if skipped else state.spikes.update(loss_val)
        return StepEvent(state.step, loss_val, grad_norm, lr, seconds, skipped, spike, state.tokens_seen,
                         t.global_batch_tokens / seconds, state.elapsed_s)

    def validation_due(self) -> bool:
        step, t = self.state.step, self.cfg.training
        return self.plan.validate and (step % t.eval_every_steps == 0 or step == t.max_steps or step == 1)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss over the first ``eval_batches`` micro-batches of the validation split (the same
        batches every time), averaged over ranks."""
        t = self.cfg.training
        val = TokenLoader(self.cfg.data.dirs, self.cfg.data.val_split, t.micro_batch_size, self.plan.seq_len,
                          t.seed, self.info.dp_rank, self.info.dp_size)
        self.model.eval()
        total = torch.zeros((), device=self.info.device)
        with eager_no_grad(self.parallel, self.info):
            for _ in range(t.eval_batches):
                batch = next(val).to(self.info.device)
                total += self.loss(batch[:, :-1], batch[:, 1:], chunked=False).float()
        self.model.train()
        loss = all_reduce_mean(total / t.eval_batches)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    def checkpoint_due(self) -> bool:
        every, step = self.cfg.checkpoint.every_steps, self.state.step
        return bool(every and step % every == 0) or step == self.cfg.training.max_steps

    def save_checkpoint(self) -> Path:
        self.state.elapsed_s = self._elapsed_base + time.perf_counter() - self._t_start
        trainer_state = {**self.state.state_dict(), "identity": self.plan.identity, "config": self.cfg.to_dict()}
        self.last_checkpoint = path = save_checkpoint(self.plan.run_dir / "checkpoints", self.state.step,
                                                      self.model, self.optimizer, trainer_state,
                                                      self.info.is_main, self.cfg.checkpoint.keep_last)
        self.saved_step = self.state.step
        return path


@torch.no_grad()
def global_grad_norm(params) -> float:
    """The L2 norm of all gradients together (over every shard and rank under FSDP and tensor
    parallelism: DTensor reduces each mesh axis's partial norms in ``full_tensor``)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: reduce the shards' partial norms
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def clip_gradients_(params, grad_norm: float, max_norm: float) -> None:
    """Scale gradients so their global norm is at most ``max_norm`` (0: no clipping). Scales only
    when clipping, which saves a pass over the gradients on most steps."""
    if 0 < max_norm < grad_norm:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], max_norm / (grad_norm + 1e-6))


# -- 5. finish ------------------------------------------------------------------------------------
def finish(trainer: Trainer, callbacks: CallbackList) -> dict[str, Any]:
    """Export the final weights (RUN_DIR/final), close the reports; rank 0 returns the summary."""
    if trainer.cfg.checkpoint.export_final:
        export_final(trainer.model, trainer.plan.model_cfg, trainer.plan.run_dir / "final",
                     trainer.plan.tokenizer_model, trainer.info.is_main)
    callbacks.on_close()
    summary = callbacks.on_end()
    barrier()
    return summary


def export_final(model, model_cfg: ModelConfig, out: Path, tokenizer_model: Path | None, is_main: bool) -> None:
    """The trained weights as one native checkpoint (what generate/eval/export-hf read); a
    collective under FSDP (every rank gathers its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..interop import save_native

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        save_native(full, model_cfg, out, tokenizer_model=tokenizer_model)  # type: ignore[arg-type]  # full: tensors
