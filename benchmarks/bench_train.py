"""Training-step throughput: llama-pretrain vs transformers.LlamaForCausalLM on CPU, same run.

Both models have the same shape (preset llama2-small: dim 512, 8 layers, GQA 8/4, FFN 1536, vocab
32000) and are trained on the same batches at sequence 512 with the same step: forward, mean
cross-entropy in fp32, backward, clip to 1.0, AdamW (0.9, 0.95, eps 1e-5, wd 0.1 on linear weights,
foreach kernel). Steps alternate between the two models so machine noise hits both alike; the
median step time is reported. MFU uses FLOPs/token = 6*N_non_embedding + 12*L*H*Q*T against the
best fp32 matmul rate measured here at start-up.

    python benchmarks/bench_train.py [--steps 6] [--batch 4] [--seq 512] [--threads N]
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


def make_step(model, forward, lr=1e-3):
    from llama_pretrain.train.optim import build_optimizer

    opt = build_optimizer(model, lr, implementation="foreach")
    params = [p for p in model.parameters()]

    def step(batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = forward(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per model (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llama_pretrain.compute.flops import flops_per_token
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.model import Transformer
    from llama_pretrain.train.loss import lm_loss
    from llama_pretrain.train.metrics import measure_matmul_peak

    cfg = ModelConfig.from_preset("llama2-small")
    torch.manual_seed(0)
    ours = Transformer(cfg)
    theirs = hf_model(cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs, (n_ours, n_theirs)

    from llama_pretrain.train.optim import build_optimizer
    opt = build_optimizer(ours, 1e-3, implementation="foreach")
    params = list(ours.parameters())

    def our_step(batch):  # exactly the training loop's step (train/loop.py)
        loss = lm_loss(ours(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    their_step = make_step(theirs, lambda x: theirs(input_ids=x).logits)
    peak = measure_matmul_peak("cpu")
    fpt = flops_per_token(cfg, args.seq)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
               for _ in range(args.steps + 1)]
    times = {"llama-pretrain": [], "transformers": []}
    losses = {"llama-pretrain": [], "transformers": []}
    for i, batch in enumerate(batches):
        for name, fn in (("llama-pretrain", our_step), ("transformers", their_step)):
            t0 = time.perf_counter()
            losses[name].append(fn(batch))
            if i:  # the first step of each is warm-up
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"config: llama2-small (dim {cfg.dim}, {cfg.n_layers} layers, GQA {cfg.n_heads}/{cfg.kv_heads}, "
          f"vocab {cfg.vocab_size}), {n_ours / 1e6:.1f}M params, batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads")
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; FLOPs/token {fpt / 1e6:.1f}M (6N+12LHQT)")
    rates = {}
    for name in times:
        med = statistics.median(times[name])
        rates[name] = tokens / med
        print(f"{name:>15}: {rates[name]:8.0f} tokens/s  (median step {med:.3f} s)  "
              f"MFU {100 * rates[name] * fpt / peak:5.1f}%  first loss {losses[name][0]:.4f}")
    print(f"ratio llama-pretrain / transformers: {rates['llama-pretrain'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
