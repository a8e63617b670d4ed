"""Single-GPU training throughput: tokens/s, MFU and peak memory of a Llama config in bf16.

The model goes through the same ``parallelize`` the trainer uses (FSDP2 ``fully_shard`` per block
with bf16 params / fp32 reduce, ``torch.compile`` per block, optional activation checkpointing),
with fused AdamW and the model's own loss path, on random tokens (throughput does not depend on
the data). MFU uses the FLOPs-per-token definition printed with it against the device's bf16 peak.

    python benchmarks/gpu_train.py --preset llama2-1b --seq-len 4096 --micro-batch 2 --steps 10

Each variant given with --variants runs in its own process (a failed or out-of-memory variant does
not take the others down); one JSON line per variant goes to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run_one(args) -> dict:
    import torch

    from llama_pretrain.compute.flops import flops_per_token, param_counts
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.train.parallel import init_distributed, parallelize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=args.seq_len, **overrides)
    torch.backends.cuda.matmul.allow_tf32 = True
    info = init_distributed("cuda")
    if args.mode == "fsdp" and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", device_id=info.device)
    torch.manual_seed(0)
    from llama_pretrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=info.device)
    model.init_weights()
    model = parallelize(model, info, mode=args.mode, compile=args.compile,
                        activation_checkpointing=args.ac, mixed_precision="bf16")
    def make_opt(fused: bool):
        kind = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5,
                                 weight_decay=0.1, **kind)

    opt = make_opt(fused=True)
    optimizer_kind = "fused"
    B, T = args.micro_batch, args.seq_len
    gen = torch.Generator(device=info.device).manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), device=info.device, generator=gen)
               for _ in range(4)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.mode != "fsdp" else None

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

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(args.steps):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    tokens_per_s = B * T * args.steps / seconds
    fpt = flops_per_token(cfg, T)
    peak = 989e12
    return {
        "preset": args.preset, "n_layers": cfg.n_layers, "params": param_counts(cfg).total,
        "mode": args.mode, "compile": args.compile, "activation_checkpointing": args.ac,
        "seq_len": T, "micro_batch": B, "steps": args.steps, "warmup_s": round(warm_s, 1),
        "step_s": round(seconds / args.steps, 4), "tokens_per_s": round(tokens_per_s),
        "mfu": round(fpt * tokens_per_s / peak, 4), "flops_per_token": fpt,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(float(loss), 4), "optimizer": optimizer_kind, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
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
    p.add_argument("--ac", action=argparse.BooleanOptionalAction, default=False)
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
