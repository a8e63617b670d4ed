"""Compare the memory estimate (compute/memory.py) with torch.cuda.max_memory_allocated.

Trains a small Llama (llama2-small: dim 512, 8 layers, GQA 8/4, vocab 32000) for two AdamW steps
on one CUDA GPU in four set-ups (fp32; bf16 autocast over fp32 weights; pure bf16; autocast with
per-block activation checkpointing) and measures the peak of the second, steady-state step.
Prints one JSON object: per set-up the measured peak, the estimated ``peak`` and ``total``, and the
ratios. Runs in well under a minute:  python benchmarks/gpu_memory_check.py [--seq 1024 --batch 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from llama_pretrain.compute.memory import training_memory
from llama_pretrain.config import ModelConfig
from llama_pretrain.model import Transformer

CASES = {  # name: (param dtype, compute dtype, autocast, activation checkpointing)
    "fp32": ("fp32", "fp32", False, False),
    "autocast-bf16": ("fp32", "bf16", True, False),
    "bf16": ("bf16", "bf16", False, False),
    "autocast-bf16-checkpointing": ("fp32", "bf16", True, True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _checkpoint_blocks(model: Transformer) -> None:
    for block in model.layers.values():
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def _saved_bytes_hooks(model, seen):
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        s = t.untyped_storage()
        if t.is_floating_point() and s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def measure(cfg, seq, batch, param, compute, autocast, ckpt) -> tuple[int, dict]:
    """Peak of the second step, and a per-phase breakdown (bytes above the model states)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to("cuda", DTYPES[param])
    if ckpt:
        _checkpoint_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    peak, phases = 0, {}
    sync = torch.cuda.synchronize
    for _step in range(2):
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seen = {}
        hooks = contextlib.nullcontext() if ckpt else _saved_bytes_hooks(model, seen)
        with hooks, torch.autocast("cuda", dtype=DTYPES[compute], enabled=autocast):
            loss = model(tokens, tokens)
        sync()
        phases = {"states": base, "saved_tensors": sum(seen.values()),
                  "after_forward": torch.cuda.memory_allocated() - base,
                  "forward_peak": torch.cuda.max_memory_allocated() - base}
        loss.backward()
        sync()
        phases["backward_peak"] = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        phases["optimizer_peak"] = torch.cuda.max_memory_allocated() - base
        peak = base + max(phases["backward_peak"], phases["optimizer_peak"])
    del model, opt, tokens, loss
    torch.cuda.empty_cache()
    return peak, phases


def sdpa_backends() -> dict:
    """Which fused attention kernels accept a GQA call (else PyTorch falls back to the math one,
    which keeps the T x T attention matrix)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {}
    for dtype in ("fp32", "bf16"):
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=DTYPES[dtype])
        kv = torch.randn(2, 4, 256, 64, device="cuda", dtype=DTYPES[dtype])
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
                out[f"{dtype}-{name.lower()}"] = True
            except Exception:
                out[f"{dtype}-{name.lower()}"] = False
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-small")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA GPU"}))
        return 1
    cfg = ModelConfig.from_preset(args.preset)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": args.preset,
           "seq_len": args.seq, "micro_batch": args.batch, "cases": {}}
    t0 = time.time()
    for name, (param, compute, autocast, ckpt) in CASES.items():
        measured, phases = measure(cfg, args.seq, args.batch, param, compute, autocast, ckpt)
        est = training_memory(cfg, args.seq, args.batch, 1, activation_checkpointing=ckpt,
                              param_dtype=param, compute_dtype=compute, autocast=autocast,
                              fused_attention=compute != "fp32")  # no fused fp32 GQA kernel on CUDA
        out["cases"][name] = {
            "measured_max_allocated": measured, "estimated_peak": est["peak"],
            "estimated_total": est["total"], "ratio_measured_to_peak": measured / est["peak"],
            "ratio_measured_to_total": measured / est["total"],
            "parts": {k: est[k] for k in ("weights", "gradients", "optimizer", "activations", "transient")},
            "measured_phases": phases,
        }
    out["sdpa_gqa_backends"] = sdpa_backends()
    out["seconds"] = time.time() - t0
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
