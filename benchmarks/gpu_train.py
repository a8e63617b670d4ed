"""Single-GPU training throughput: tokens/s, MFU and peak memory of a Llama config in bf16.

The model goes through the same ``parallelize`` the trainer uses (FSDP2 ``fully_shard`` per block
with bf16 params / fp32 reduce, ``torch.compile`` per block, optional activation checkpointing),
with fused AdamW and the model's own loss path, on random tokens (throughput does not depend on
the data). MFU uses the FLOPs-per-token definition printed with it against the device's bf16 peak.

    python benchmarks/gpu_train.py --preset llama2-1b --seq-len 4096 --micro-batch 2 --steps 10

Each variant given with --variants runs in its own process (a failed or out-of-memory variant does
not take the others down); one JSON line per variant goes to stdout and to --out.

``--ac full|selective`` checkpoints activations (selective only where ``parallelize`` offers it),
``--float8`` swaps the blocks' linear layers for torchao's float8 training ones, ``--losses`` adds
every step's loss. Without CUDA it runs on the CPU (gloo, wall-clock timing, no peak memory), which
is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time


def ac_modes() -> tuple[str, ...]:
    """The activation-checkpointing modes ``parallelize`` accepts in this tree (``selective`` once
    it exists; a plain bool parameter would silently read any string as ``full``)."""
    from llama_pretrain.train import parallelize

    return ("none", "full", "selective") if "selective" in inspect.getsource(parallelize) else ("none", "full")


def ac_argument(mode: str):
    """What ``ParallelConfig(activation_checkpointing=...)`` takes for ``mode``."""
    if mode not in ac_modes():
        raise SystemExit(f"activation checkpointing {mode!r} is not offered by parallelize here")
    return {"none": False, "full": True}.get(mode, mode)  # the bools keep today's meaning


def run_one(args) -> dict:
    import torch

    from llama_pretrain.compute.flops import flops_per_token, param_counts
    from llama_pretrain.compute.gpus import peak_flops_for_device
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.train.config import ParallelConfig
    from llama_pretrain.train.distributed import init_distributed
    from llama_pretrain.train.parallelize import apply_float8, parallelize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=args.seq_len, **overrides)
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = True
    info = init_distributed("cuda" if cuda else "cpu")
    if args.mode == "fsdp" and not torch.distributed.is_initialized():
        if cuda:
            torch.distributed.init_process_group("nccl", device_id=info.device)
        else:
            torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    from llama_pretrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=info.device)
    model.init_weights()
    float8 = ParallelConfig(float8=True, float8_emulate=not cuda)
    float8_layers = apply_float8(model, float8, info) if args.float8 else 0  # parallel.float8's own
    model = parallelize(model, ParallelConfig(mode=args.mode, compile=args.compile, mixed_precision="bf16",
                                              activation_checkpointing=ac_argument(args.ac)), info)
    def make_opt(fused: bool):
        kind = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-5,
                                 weight_decay=0.1, **kind)

    opt = make_opt(fused=True)
    optimizer_kind = "fused"
    B, T = args.micro_batch, args.seq_len
    gen = torch.Generator(device=info.device).manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), device=info.device, generator=gen)
               for _ in range(4)]
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if args.mode != "fsdp" else None

    def step(i):
        nonlocal opt, optimizer_kind
        x = batches[i % len(batches)]
        if autocast is not None:
            with autocast:
                loss = model(x[:, :-1], x[:, 1:])
        else:
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        try:
            opt.step()
        except (RuntimeError, TypeError) as e:  # a fused kernel that this build lacks for DTensor
            if optimizer_kind != "fused":
                raise
            print(f"fused AdamW failed ({e}); using foreach", file=sys.stderr)
            opt, optimizer_kind = make_opt(fused=False), "foreach"
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    losses = []
    for i in range(args.warmup):
        losses.append(step(i).detach())
    sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
    t1 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
        losses.append(loss.detach())  # no host sync: read once at the end
    if cuda:
        end.record()
    sync()
    seconds = start.elapsed_time(end) / 1000 if cuda else time.perf_counter() - t1
    tokens_per_s = B * T * args.steps / seconds
    fpt = flops_per_token(cfg, T)
    # The table's peak for a known GPU; on CPU (the script's own check) the H100/H200 figure,
    # so the field exists, though it means nothing there.
    peak = (peak_flops_for_device(torch.cuda.get_device_name()) if cuda else None) or 989e12
    extra = {"losses": [round(float(x), 4) for x in losses]} if args.losses else {}
    return {
        "preset": args.preset, "n_layers": cfg.n_layers, "params": param_counts(cfg).total,
        "mode": args.mode, "compile": args.compile, "activation_checkpointing": args.ac,
        "float8_layers": float8_layers, "vocab_size": cfg.vocab_size, "peak_flops": peak,
        "seq_len": T, "micro_batch": B, "steps": args.steps, "warmup_s": round(warm_s, 1),
        "step_s": round(seconds / args.steps, 4), "tokens_per_s": round(tokens_per_s),
        "mfu": round(fpt * tokens_per_s / peak, 4), "flops_per_token": fpt,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "loss": round(float(loss.detach()), 4), "optimizer": optimizer_kind,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, **extra,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-1b")
    p.add_argument("--n-layers", type=int, default=0, help="override the preset's layer count (a slice)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="fsdp", choices=["none", "fsdp"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ac", nargs="?", const="full", default="none", choices=["none", "full", "selective"],
                   help="activation checkpointing (bare --ac: full)")
    p.add_argument("--no-ac", dest="ac", action="store_const", const="none")
    p.add_argument("--vocab-size", type=int, default=0, help="override the preset's vocabulary")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--float8", action=argparse.BooleanOptionalAction, default=False,
                   help="torchao float8 linears in the blocks")
    p.add_argument("--losses", action=argparse.BooleanOptionalAction, default=False,
                   help="report every step's loss")
    p.add_argument("--variants", nargs="*", default=None,
                   help="several runs, each 'key=value,key=value' over the flags above")
    p.add_argument("--deadline-s", type=float, default=420, help="skip variants that would start after this")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    if args.variants is None:
        result = run_one(args)
        print(json.dumps(result), flush=True)
        return 0
    t0 = time.perf_counter()
    for v in args.variants:
        if time.perf_counter() - t0 > args.deadline_s:
            print(json.dumps({"variant": v, "skipped": "deadline"}), flush=True)
            continue
        cmd = [sys.executable, __file__]
        for kv in filter(None, v.split(",")):
            k, val = kv.split("=", 1)
            flag = "--" + k.replace("_", "-")
            if val in ("true", "false"):
                cmd.append(flag if val == "true" else "--no-" + flag[2:])
            else:
                cmd += [flag, val]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else json.dumps(
            {"variant": v, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
