"""Training-step memory: llama-pretrain vs transformers.LlamaForCausalLM on CPU, same weights.

Each row runs in a fresh subprocess: build the model (ours seeded; transformers' loaded with our
weights), take one training step as ``bench_train.py`` does (forward, fp32 loss, backward, clip,
fused AdamW, ``zero_grad``), so that weights, gradients' allocations and AdamW state exist; then
reset the process's peak RSS (``/proc/self/clear_refs``), take a second step on another batch and
report its peak RSS above the RSS before it (after glibc's ``malloc_trim``, so memory the first
step freed but the allocator kept does not hide the second's): the activations, the loss and the transients (the
model and optimizer state are in the baseline). As a cross-check, the bytes autograd saved for
backward in that step (unique storages seen by saved-tensor hooks, less parameters; not visible
inside checkpointed blocks, so "-" there). Rows: ours (the output head fused with the loss,
``losses.linear_cross_entropy``); ours with the head's logits and the chunked loss as before the
fusion (``chunked_loss=True``); ours with that loss and the plain-ops formulation from before the
lean RMSNorm/SwiGLU/RoPE (monkeypatched, as in tests/test_kernels.py); transformers; ours with
full and with selective activation checkpointing. Linux only (reads /proc).

    python benchmarks/bench_memory.py [--batch 4] [--seq 512] [--preset llama2-small]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROWS = ["llama-pretrain", "llama-pretrain head not fused (before)", "llama-pretrain plain ops (before)",
        "transformers", "llama-pretrain full ckpt", "llama-pretrain selective ckpt"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def child(row: str, args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import hf_loss, hf_model, make_step

    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop.hf import to_hf_state_dict
    from llama_pretrain.model import Transformer

    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    if row == "transformers":
        model = hf_model(cfg)
        model.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg))
        del ours
        step = make_step(model, lambda x, y: hf_loss(model(input_ids=x).logits, y), "fp32")
    else:
        model = ours
        if row.endswith("plain ops (before)"):
            _plain_ops()
        if "ckpt" in row:
            from llama_pretrain.train.config import ParallelConfig
            from llama_pretrain.train.distributed import DistInfo
            from llama_pretrain.train.parallelize import apply_activation_checkpointing

            apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=row.split()[1]), DistInfo())
        # The rows marked "(before)" compute the logits, then the chunked loss (as before the fusion).
        loss_of = (lambda x, y: model(x, y, chunked_loss=True)) if row.endswith("(before)") else model
        step = make_step(model, loss_of, "fp32")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen) for _ in range(2)]
    step(batches[0])
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if t.is_floating_point() and s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    try:  # hand memory freed by the first step back to the OS, so the baseline is what is live
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    base = _status("VmRSS")
    _reset_peak()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(batches[1])
    peak = _status("VmHWM")
    return {"row": row, "above": peak - base, "base": base, "saved": sum(seen.values()), "loss": loss}


def _plain_ops() -> None:
    """The formulation before the lean autograd Functions: plain ops throughout."""
    import torch
    import torch.nn.functional as F

    from llama_pretrain import model as m

    def old_rope(x, cos, sin):
        xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
        x0, x1 = xf[..., 0], xf[..., 1]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)

    m.RMSNorm.forward = lambda self, x: m.rms_norm_reference(x, self.weight, self.eps)
    m.FeedForward.forward = lambda self, x: self.w2(F.silu(self.w1(x)) * self.w3(x))
    m.apply_rope = old_rope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--preset", default="llama2-small")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(f"config: {args.preset}, fp32, batch {args.batch} x seq {args.seq}; peak RSS of the second "
          f"training step above the RSS before it; load average {os.getloadavg()[0]:.2f}")
    res = {}
    for row in ROWS:
        out = subprocess.run([sys.executable, __file__, "--child", row, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--preset", args.preset],
                             check=True, capture_output=True, text=True).stdout
        res[row] = json.loads(out.strip().splitlines()[-1])
    ref = res["transformers"]["above"]
    for row, r in res.items():
        saved = f"{r['saved'] / 2**20:8.1f} MiB" if "ckpt" not in row else "       - MiB"
        print(f"  {row:>38}: peak above model {r['above'] / 2**20:8.1f} MiB  ({r['above'] / ref:.2f}x "
              f"transformers)  autograd saved {saved}  model+optimizer RSS {r['base'] / 2**20:7.1f} MiB  "
              f"loss {r['loss']:.4f}")
    print(f"  ratio llama-pretrain / transformers: {res['llama-pretrain']['above'] / ref:.2f}x "
          f"(load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
