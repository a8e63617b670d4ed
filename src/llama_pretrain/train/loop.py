"""The training loop: one function, ``train(cfg, run_dir)``, the same in one process and under torchrun.

Per optimizer step each rank runs ``accumulation_steps`` micro-batches of ``micro_batch_size``
sequences (so that micro-batch x accumulation x world size x seq_len = ``global_batch_tokens``),
averages the loss over them, clips the global gradient norm, and steps AdamW at the scheduled LR.
Everything a resumed run needs to continue bit-for-bit (weights, AdamW moments, loader position,
RNG, step, guard statistics) is in each checkpoint; metrics logged after the checkpoint a run
resumes from are dropped from ``metrics.jsonl`` so every step appears once.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fsutil import atomic_file
from .config import RunConfig

TRAINER_FORMAT = "llama-pretrain-trainer/1"


def _say(msg: str, is_main: bool = True) -> None:
    if is_main:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def find_tokenizer_model(cfg: RunConfig) -> Path | None:
    """The tokenizer.model the shards were made with: data.tokenizer, else one recorded in or next
    to the dataset."""
    if cfg.data.tokenizer:
        p = Path(cfg.data.tokenizer)
        if not p.is_file():
            raise UserError(f"data.tokenizer {p} does not exist")
        return p
    data = Path(cfg.data.path)
    if (data / "tokenizer.model").is_file():
        return data / "tokenizer.model"
    try:
        from ..data.shards import read_manifest
        recorded = read_manifest(data).get("tokenizer", {}).get("path")
    except UserError:
        return None
    if recorded:  # as recorded (absolute or relative to where prepare ran), else beside the data
        for p in (Path(recorded), data / recorded, data / Path(recorded).name, data.parent / Path(recorded).name):
            if p.is_file():
                return p
    return None


def run_identity(model_cfg, loader) -> dict[str, Any]:
    """What makes two runs 'the same run' for resuming: the model and the training data."""
    return {"model": model_cfg.to_dict(),
            "data": {"tokenizer_sha256": loader.tokenizer_sha256, "train_tokens": loader.num_tokens}}


def _identity_diff(a: dict, b: dict) -> str | None:
    for part in ("model", "data"):
        x, y = a.get(part, {}), b.get(part, {})
        for key in sorted(set(x) | set(y)):
            if x.get(key) != y.get(key):
                return f"{part}.{key} is {x.get(key)!r} there, {y.get(key)!r} here"
    return None


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; resumes automatically from its latest valid checkpoint
    (``resume=True`` requires one). Returns the run summary (also written to summary.json)."""
    from ..compute.flops import flops_per_token
    from ..data.loader import TokenLoader
    from ..data.shards import read_manifest
    from ..model import Transformer
    from . import checkpoint as ckpt_io
    from .guards import NonFiniteGuard, SpikeDetector
    from .loss import lm_loss
    from .metrics import MetricsWriter, resolve_precision, truncate_metrics
    from .optim import build_optimizer, lr_at, set_lr
    from .parallel import all_reduce_max, all_reduce_mean, barrier, grad_sync, init_distributed, parallelize

    run_dir = Path(run_dir)
    t, opt = cfg.training, cfg.optimizer
    info = init_distributed(t.device)
    model_cfg = cfg.model_config()
    seq_len = cfg.seq_len
    accum = cfg.accumulation_steps(info.world_size)
    if not cfg.data.path:
        raise UserError("data.path is not set: point it at a prepared dataset (llama-pretrain data prepare)")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory")

    # -- check everything before writing anything ------------------------------------------------
    loader = TokenLoader(cfg.data.path, "train", t.micro_batch_size, seq_len, t.seed, info.rank, info.world_size)
    if loader.vocab_size != model_cfg.vocab_size:
        raise UserError(f"the dataset {cfg.data.path} was tokenized with a vocabulary of {loader.vocab_size}, "
                        f"the model has vocab_size {model_cfg.vocab_size}; set model.vocab_size or re-tokenize")
    do_eval = bool(cfg.data.val_split) and t.eval_every_steps > 0
    if do_eval and cfg.data.val_split not in read_manifest(cfg.data.path).get("splits", {}):
        raise UserError(f"{cfg.data.path} has no {cfg.data.val_split!r} split; set data.val_split=\"\" "
                        f"to train without validation")
    identity = run_identity(model_cfg, loader)
    ckpt_root = run_dir / "checkpoints"
    run_file = run_dir / "run.json"
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{run_file} is unreadable; use another --run-dir") from None
        diff = _identity_diff(previous, identity)
        if diff:
            raise UserError(f"{run_dir} holds another run ({diff}); use another --run-dir")
    start_ckpt = None
    if ckpt_io.list_checkpoints(ckpt_root):
        start_ckpt = ckpt_io.latest_valid(ckpt_root, warn=lambda m: _say(m, info.is_main))
        if start_ckpt is None:
            raise UserError(f"every checkpoint in {ckpt_root} is damaged; nothing to resume from")
        start_state = ckpt_io.read_trainer_state(start_ckpt)
        diff = _identity_diff(start_state.get("identity", {}), identity)
        if diff:
            raise UserError(f"{run_dir} holds checkpoints of another run ({diff}); use another --run-dir")
        if int(start_state.get("step", 0)) > t.max_steps:  # would export the later weights as this run's
            raise UserError(f"{start_ckpt} is at step {start_state['step']}, past training.max_steps="
                            f"{t.max_steps}; raise max_steps or use another --run-dir")
    elif resume:
        raise UserError(f"--resume: no checkpoint in {ckpt_root}")
    tokenizer_model = find_tokenizer_model(cfg)

    # -- model, parallelism, optimizer -----------------------------------------------------------
    torch.manual_seed(t.seed)
    device = info.device
    mixed = cfg.parallel.mixed_precision
    if mixed == "auto" and start_ckpt is not None:  # a resumed run keeps the precision it chose
        mixed = start_state.get("precision", "auto")
    mixed, peak, peak_source = resolve_precision(device, mixed, cfg.logging.peak_flops)
    chosen = ckpt_io.gather_object(mixed)[0]  # a timing-based choice: every rank follows rank 0's
    if chosen != mixed:
        mixed, peak, peak_source = resolve_precision(device, chosen, cfg.logging.peak_flops)
    with torch.device(device):
        model = Transformer(model_cfg)
    model = parallelize(model, info, cfg.parallel.mode, compile=cfg.parallel.compile,
                        activation_checkpointing=cfg.parallel.activation_checkpointing,
                        mixed_precision=mixed, reshard_after_forward=cfg.parallel.reshard_after_forward)
    optimizer = build_optimizer(model, cfg.peak_lr, (opt.beta1, opt.beta2), opt.eps, opt.weight_decay,
                                opt.decay_embeddings, opt.implementation)
    # FSDP's mixed-precision policy casts parameters itself; otherwise autocast does (fp32 masters).
    use_autocast = mixed == "bf16" and cfg.parallel.mode != "fsdp"

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    energy_before = {"kwh": 0.0, "tco2eq": 0.0}
    guard = NonFiniteGuard(t.max_nonfinite_in_row)
    spikes = SpikeDetector(t.spike_sigma)
    if start_ckpt is not None:
        state = ckpt_io.load_checkpoint(start_ckpt, model, optimizer)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        energy_before = state.get("energy", energy_before)
        loaders, rngs = state["loader"], state["rng"]
        same_world = len(loaders) == info.world_size
        loader.load_state_dict(loaders[info.rank] if same_world else loaders[0])
        ckpt_io.set_rng_state(rngs[info.rank] if same_world else rngs[0])
        spikes.load_state_dict(state["guards"]["spike"])
        guard.in_row = int(state["guards"]["nonfinite_in_row"])
        _say(f"resuming from {start_ckpt} (step {step}, {tokens_seen:,} tokens)", info.is_main)

    # -- reporting ---------------------------------------------------------------------------------
    fpt = flops_per_token(model_cfg, seq_len)
    writer = meter = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_file, "w") as fh:
            json.dump({"format": TRAINER_FORMAT, "identity": identity, "config": cfg.to_dict(),
                       "world_size": info.world_size, "precision": mixed, "peak_flops": peak,
                       "peak_source": peak_source,
                       "flops_per_token": fpt}, fh, indent=1)
        truncate_metrics(run_dir / "metrics.jsonl", step)
        writer = MetricsWriter(run_dir, cfg.logging.tensorboard, resume_step=step)
        try:
            from ..compute.energy import EnergyMeter
            meter = EnergyMeter(str(device))
            meter.start()
        except ImportError:
            meter = None
        _say(f"training {cfg.model.get('preset', 'custom')}: {sum(p.numel() for p in model.parameters()):,} "
             f"params, seq {seq_len}, global batch {t.global_batch_tokens:,} tokens = {info.world_size} rank(s) "
             f"x {t.micro_batch_size} seq x {accum} accumulation; {mixed} compute, fp32 weights; "
             f"{fpt / 1e6:.1f} MFLOP/token; MFU vs "
             f"{peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

    from tqdm import tqdm
    bar = tqdm(total=t.max_steps, initial=step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not (info.is_main and cfg.logging.progress), desc="train")
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast
                else contextlib.nullcontext())
    last_val = None
    first_val = None
    t_start = time.perf_counter()
    model.train()
    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.peak_lr, cfg.schedule.warmup_steps, t.max_steps, cfg.schedule.min_lr_ratio)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next(loader).to(device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with grad_sync(model, micro == accum - 1):
                with autocast:
                    loss = lm_loss(model(inputs), targets, t.fused_loss)
                if t.debug_nan_at_step == step + 1:
                    loss = loss * float("nan")
                (loss / accum).backward()
            loss_sum += loss.detach()
        loss_val = all_reduce_mean(loss_sum / accum)
        grad_norm = global_grad_norm(params)
        bad = not (math.isfinite(loss_val) and math.isfinite(grad_norm))
        bad = all_reduce_max(float(bad)) > 0  # every rank must agree to skip
        if not bad:
            if 0 < opt.grad_clip < grad_norm:  # scale only when clipping (saves a pass over the grads)
                torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                    opt.grad_clip / (grad_norm + 1e-6))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += t.global_batch_tokens
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        tok_s = t.global_batch_tokens / dt
        mfu = tok_s * fpt / (peak * info.world_size)
        if mfu > 1.0 and peak_source.startswith("measured"):
            # The start-up matmul ran while the machine was busy; measure the peak again, now.
            peak = max(peak, remeasure_peak(device, mixed))
            mfu = tok_s * fpt / (peak * info.world_size)

        record: dict[str, Any] = {
            "step": step, "loss": loss_val if math.isfinite(loss_val) else None,
            "perplexity": math.exp(min(loss_val, 50.0)) if math.isfinite(loss_val) else None,
            "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens_seen": tokens_seen, "tokens_per_s": tok_s, "mfu": mfu, "step_time_s": dt,
            "elapsed_s": elapsed_before + time.perf_counter() - t_start,
        }
        if bad:
            record["skipped"] = "non-finite loss or gradient"
            _say(f"step {step}: non-finite loss ({loss_val}) or grad norm ({grad_norm}); optimizer step "
                 f"skipped", info.is_main)
        else:
            z = spikes.update(loss_val)
            if z is not None:
                record["loss_spike_sigma"] = z
                _say(f"step {step}: loss spike {loss_val:.4f} ({z:.1f} sigma above its running mean)", info.is_main)
        if do_eval and (step % t.eval_every_steps == 0 or step == t.max_steps or step == 1):
            val = evaluate(model, cfg, info, autocast)
            record["val_loss"] = val
            record["val_perplexity"] = math.exp(min(val, 50.0))
            first_val = val if first_val is None else first_val
            last_val = val
        energy_now = energy_before
        if meter is not None:  # energy of this process plus that of the runs it resumed
            e = meter.read()
            energy_now = {"kwh": energy_before["kwh"] + e["kwh"], "tco2eq": energy_before["tco2eq"] + e["tco2eq"]}
            record["kwh"], record["tco2eq"] = energy_now["kwh"], energy_now["tco2eq"]
        if writer is not None and (step % cfg.logging.every_steps == 0 or "val_loss" in record or bad
                                   or step == t.max_steps):
            writer.write(record)
        bar.update(1)
        if bar.disable is False:
            post = {"loss": f"{loss_val:.3f}", "tok/s": f"{tok_s:,.0f}", "mfu": f"{100 * mfu:.1f}%"}
            if last_val is not None:
                post["val"] = f"{last_val:.3f}"
            bar.set_postfix(post, refresh=False)

        guard.record(step, bad)  # raises after K non-finite steps in a row
        every = cfg.checkpoint.every_steps
        if (every and step % every == 0) or step == t.max_steps:
            trainer_state = {
                "format": TRAINER_FORMAT, "step": step, "tokens_seen": tokens_seen,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                "energy": energy_now,
                "loader": ckpt_io.gather_object(loader.state_dict()),
                "rng": ckpt_io.gather_object(ckpt_io.rng_state()),
                "world_size": info.world_size, "precision": mixed,
                "schedule": {"peak_lr": cfg.peak_lr, "warmup_steps": cfg.schedule.warmup_steps,
                             "max_steps": t.max_steps, "min_lr_ratio": cfg.schedule.min_lr_ratio,
                             "last_lr": lr},
                "guards": {"spike": spikes.state_dict(), "nonfinite_in_row": guard.in_row},
                "identity": identity, "config": cfg.to_dict(),
            }
            ckpt_io.save_checkpoint(ckpt_root, step, model, optimizer, trainer_state, info.is_main,
                                    cfg.checkpoint.keep_last)
    bar.close()

    # -- the end: final weights in the native format, summary --------------------------------------
    if cfg.checkpoint.export_final:
        export_final(model, model_cfg, run_dir / "final", tokenizer_model, info.is_main)
    summary = None
    if info.is_main:
        energy = meter.stop() if meter is not None else None
        if energy is not None:
            energy = dict(energy, kwh=energy_before["kwh"] + energy["kwh"],
                          tco2eq=energy_before["tco2eq"] + energy["tco2eq"])
        writer.close()
        summary = summarize(run_dir, energy, peak_source)
        with atomic_file(run_dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=1)
    barrier()
    return summary or {}


def remeasure_peak(device, precision: str) -> float:
    """The CPU matmul peak measured again (without touching the training RNG stream)."""
    from .metrics import measure_matmul_peak

    with torch.random.fork_rng(devices=[]):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure_matmul_peak(device, 1024, dtype, repeats=10)


@torch.no_grad()
def global_grad_norm(params) -> float:
    """The L2 norm of all gradients together (over every shard and rank under FSDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: reduce the shards' partial norms
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(model, cfg: RunConfig, info, autocast) -> float:
    """Mean loss over the first ``eval_batches`` micro-batches of the validation split (the same
    batches every time), averaged over ranks."""
    from ..data.loader import TokenLoader
    from .loss import lm_loss

    t = cfg.training
    val = TokenLoader(cfg.data.path, cfg.data.val_split, t.micro_batch_size, cfg.seq_len, t.seed,
                      info.rank, info.world_size)
    model.eval()
    total = torch.zeros((), device=info.device)
    for _ in range(t.eval_batches):
        batch = next(val).to(info.device)
        with autocast:
            total += lm_loss(model(batch[:, :-1]), batch[:, 1:], "off").float()
    model.train()
    from .parallel import all_reduce_mean
    return all_reduce_mean(total / t.eval_batches)


def export_final(model, model_cfg, out: Path, tokenizer_model: Path | None, is_main: bool) -> None:
    """The trained weights as one native checkpoint (what generate/eval/export-hf read)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..interop import save_native

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        save_native(full, model_cfg, out, tokenizer_model=tokenizer_model)


def summarize(run_dir: Path, energy: dict | None = None, peak_source: str | None = None) -> dict[str, Any]:
    """Figures of a run from its metrics.jsonl (what the CLI prints at the end)."""
    from .metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return {"steps": 0}
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    timed = [r for r in records if r.get("tokens_per_s")][1:] or records  # step 1 includes warm-up
    last = records[-1]
    out = {
        "steps": last["step"], "tokens_seen": last["tokens_seen"], "elapsed_s": last.get("elapsed_s"),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "first_train_loss": losses[0] if losses else None,
        "first_val_loss": vals[0] if vals else None, "final_val_loss": vals[-1] if vals else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "mfu": sum(r["mfu"] for r in timed) / len(timed),
        "skipped_steps": sum(1 for r in records if r.get("skipped")),
    }
    if peak_source:
        out["mfu_peak"] = peak_source
    if energy:
        out["energy_kwh"], out["tco2eq"], out["energy_method"] = energy["kwh"], energy["tco2eq"], energy["method"]
    elif last.get("kwh") is not None:
        out["energy_kwh"], out["tco2eq"] = last["kwh"], last.get("tco2eq")
    return out
