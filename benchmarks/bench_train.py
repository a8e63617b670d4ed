"""Training-step throughput: llama-pretrain vs transformers.LlamaForCausalLM on CPU, same run.

Both models have the same shape (preset llama2-small: dim 512, 8 layers, GQA 8/4, FFN 1536, vocab
32000) and are trained on the same batches at sequence 512 with the same step: forward, mean
cross-entropy in fp32, backward, clip to 1.0, fused AdamW (0.9, 0.95, eps 1e-5, wd 0.1 on linear
weights; the default of our loop and of the HF Trainer). Each precision is compared like for like:
fp32 for both, then bf16 autocast for both. Our side uses the trainer's loss entry point,
``model(inputs, targets)`` (``losses.py``: chunked cross-entropy), theirs the upcast-then-CE of
LlamaForCausalLM. Steps alternate between the two models so machine noise hits both alike; the median step time is
reported. MFU uses FLOPs/token = 6*N_non_embedding + 12*L*H*Q*T against the best matmul rate of the
same precision measured here at start-up.

    python benchmarks/bench_train.py [--steps 4] [--batch 4] [--seq 512] [--precision both]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_cfg)
    model.config.use_cache = False
    return model


def make_step(model, loss_of, precision: str):
    """One optimizer step as the training loop does it: forward and fp32 loss (under bf16 autocast
    when asked), backward, clip 1.0, fused AdamW (the default of our loop and of the HF Trainer)."""
    from llama_pretrain.train.optim import build_optimizer

    opt = build_optimizer(model, 1e-3, implementation="fused")
    params = list(model.parameters())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast:
            loss = loss_of(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_loss(logits, targets):  # what LlamaForCausalLM's loss does: upcast the logits, then CE
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def compare(precision: str, args, cfg, peak: float, fpt: float) -> float:
    from llama_pretrain.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(cfg)
    theirs = hf_model(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    steps = {"llama-pretrain": make_step(ours, ours, precision),  # the trainer's loss entry point
             "transformers": make_step(theirs, lambda x, y: hf_loss(theirs(input_ids=x).logits, y), precision)}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(args.steps + 1)]
    times = {k: [] for k in steps}
    first = {}
    for i, batch in enumerate(batches):
        for name, fn in steps.items():  # alternate, so machine noise hits both alike
            t0 = time.perf_counter()
            loss = fn(batch)
            if i:  # the first step of each is warm-up
                times[name].append(time.perf_counter() - t0)
            else:
                first[name] = loss
    tokens = args.batch * args.seq
    rates = {}
    print(f"[{precision}] MFU against the measured {precision} matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name in times:
        med = statistics.median(times[name])
        rates[name] = tokens / med
        print(f"  {name:>15}: {rates[name]:7.0f} tokens/s  (median step {med:.2f} s of {len(times[name])})  "
              f"MFU {100 * rates[name] * fpt / peak:5.1f}%  first loss {first[name]:.4f}")
    ratio = rates["llama-pretrain"] / rates["transformers"]
    print(f"  ratio llama-pretrain / transformers: {ratio:.2f}x")
    return ratio


def parts(args) -> None:
    """The pieces our step chose by measurement: the AdamW kernel and the loss."""
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.model import Transformer
    from llama_pretrain.losses import chunked_cross_entropy
    from llama_pretrain.train.optim import build_optimizer

    model = Transformer(ModelConfig.from_preset("llama2-small"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    for impl in ("for-loop", "foreach", "fused"):
        opt = build_optimizer(model, 1e-3, implementation=impl)
        ts = []
        for _ in range(4):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        print(f"AdamW {impl:>8} step, 57.9M params: {statistics.median(ts[1:]):.3f} s")
    targets = torch.randint(0, 32000, (2048,))
    for dtype in (torch.float32, torch.bfloat16):
        res = {"F.cross_entropy(logits.float())": [], "chunked (64 rows)": []}
        for _ in range(6):
            for name in res:
                logits = torch.randn(2048, 32000).to(dtype).requires_grad_()
                t0 = time.perf_counter()
                if name.startswith("F."):
                    F.cross_entropy(logits.float(), targets).backward()
                else:
                    chunked_cross_entropy(logits, targets, chunk_rows=64).backward()
                res[name].append(time.perf_counter() - t0)
        for name, ts in res.items():
            print(f"loss fwd+bwd 2048 x 32000 {str(dtype)[6:]:>8} {name}: {statistics.median(ts[1:]):.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                    help="compute precision of both models (bf16: autocast, fp32 master weights)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--parts", action="store_true", help="also time the AdamW kernels and the two losses")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parts:
        parts(args)

    from llama_pretrain.compute.flops import flops_per_token
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.train.metrics import measure_matmul_peak

    cfg = ModelConfig.from_preset("llama2-small")
    fpt = flops_per_token(cfg, args.seq)
    print(f"config: llama2-small (dim {cfg.dim}, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.kv_heads}, "
          f"FFN {cfg.hidden_dim}, vocab {cfg.vocab_size}), batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads; FLOPs/token {fpt / 1e6:.1f}M (6N+12LHQT)")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = measure_matmul_peak("cpu", 1024, dtype)
        compare(precision, args, cfg, peak, fpt)


if __name__ == "__main__":
    main()
