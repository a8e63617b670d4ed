"""The real trainer on one GPU: `llama-pretrain train` under torchrun with FSDP2 + compile + bf16,
a resume from its sharded checkpoint, and the autocast (no FSDP) path; prints tokens/s and MFU as
logged in metrics.jsonl (median over the steps after compilation).

    python benchmarks/gpu_loop_check.py --preset llama2-1b --micro-batch 8 --steps 12 --out DIR

On a CPU-only machine it runs the same stages with a tiny preset (for checking the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_dataset(out: Path, vocab: int, tokens: int) -> Path:
    from llama_pretrain.data.shards import FORMAT, MANIFEST, ShardWriter

    rng = np.random.default_rng(0)
    splits = {}
    for split, total in (("train", tokens), ("val", max(tokens // 50, 10_000))):
        writer = ShardWriter(out, split, "uint16", shard_tokens=total // 2 + 1)
        n = 0
        while n < total:
            doc = rng.integers(3, vocab, size=int(rng.integers(500, 4000)))
            doc[0], doc[-1] = 1, 2
            writer.add(doc)
            n += len(doc)
        shards = writer.close()
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards)}
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, "dtype": "uint16",
                                            "tokenizer": {"vocab_size": vocab, "sha256": "synthetic"},
                                            "splits": splits}))
    return out


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def figures(run_dir: Path, skip: int) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r["step"] > skip] or recs
    return {"steps": recs[-1]["step"], "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
            "mfu": round(statistics.median(r["mfu"] for r in timed), 4),
            "grad_norm_last": recs[-1]["grad_norm"], "kwh": recs[-1].get("kwh")}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-1b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="gpu_loop_out")
    p.add_argument("--timeout", type=float, default=150, help="seconds per stage")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:  # script check on CPU
        args.preset, args.seq_len, args.micro_batch, args.steps = "llama2-debug", 64, 2, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gbt = args.seq_len * args.micro_batch
    vocab = 32000 if cuda else 512
    data = make_dataset(out / "data", vocab, gbt * (args.steps + 4) + 10_000)
    (out / "run.toml").write_text(f'[data]\npath = "{data}"\n')
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
            "llama_pretrain", "train", "--config", str(out / "run.toml"),
            f"--model.preset={args.preset}", f"--model.vocab_size={vocab}", f"--training.seq_len={args.seq_len}",
            f"--training.micro_batch_size={args.micro_batch}", f"--training.global_batch_tokens={gbt}",
            "--schedule.warmup_steps=2", "--training.eval_every_steps=0", "--logging.progress=false",
            "--checkpoint.export_final=false"]
    gpu = (["--parallel.compile=true", "--parallel.mixed_precision=bf16"] if cuda
           else ["--parallel.mixed_precision=fp32"])
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    fsdp_dir = out / "fsdp"
    stages = [
        ("fsdp_compile_bf16", fsdp_dir, [f"--training.max_steps={args.steps}", "--parallel.mode=fsdp",
                                         f"--checkpoint.every_steps={args.steps}", *gpu], 3),
        ("fsdp_resume", fsdp_dir, [f"--training.max_steps={args.steps + 2}", "--parallel.mode=fsdp",
                                   f"--checkpoint.every_steps={args.steps}", *gpu], args.steps + 1),
        ("autocast_compile", out / "plain", [f"--training.max_steps={max(args.steps // 2, 4)}",
                                             "--parallel.mode=none", "--checkpoint.every_steps=0", *gpu], 3),
    ]
    for name, run_dir, extra, skip in stages:
        rc, secs = run(base + ["--run-dir", str(run_dir), *extra], out / f"{name}.log", args.timeout)
        entry = {"rc": rc, "seconds": round(secs, 1)}
        if rc == 0:
            entry.update(figures(run_dir, skip))
            if name == "fsdp_resume":
                entry["resumed"] = "resuming from" in (out / f"{name}.log").read_text()
        else:
            entry["log_tail"] = (out / f"{name}.log").read_text()[-1500:]
        results[name] = entry
        print(json.dumps({name: entry}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
