"""Log-likelihood requests/s: our Transformer (NativeBackend) against transformers' LlamaForCausalLM
with the same weights, through the same harness, on the same multiple-choice workload.

    python benchmarks/bench_eval.py [--preset llama2-tiny] [--questions 64] [--batch-size 16]

Each question has 4 choices sharing one context (~120 tokens), as in HellaSwag; scores are checked
to agree between the two backends before timing is reported.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch


class ByteTok:
    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = "the a cat dog runs jumps over under quickly slowly house tree river stone light".split()
    reqs = []
    for _ in range(n):
        ctx = " ".join(rng.choice(words) for _ in range(24)) + "\nAnswer:"
        reqs += [(ctx, " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))) for _ in range(4)]
    return reqs


def main() -> None:
    from transformers import LlamaForCausalLM

    from llama_pretrain.config import ModelConfig
    from llama_pretrain.eval.harness import CausalLM, HFBackend, NativeBackend
    from llama_pretrain.interop import save_hf
    from llama_pretrain.model import Transformer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-tiny")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)  # its own vocabulary; the byte ids fit inside
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours.state_dict(), cfg, d)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    reqs = workload(args.questions)
    lms = {"llama-pretrain": CausalLM(NativeBackend(ours), ByteTok(), args.batch_size),
           "transformers": CausalLM(HFBackend(hf), ByteTok(), args.batch_size)}
    scores, best = {}, {name: float("inf") for name in lms}
    for lm in lms.values():
        lm.loglikelihood(reqs[:8])  # warm-up
    # Interleaved repeats, best of each: a busy shared machine slows both sides alike.
    for _ in range(args.repeats):
        for name, lm in lms.items():
            t = time.perf_counter()
            scores[name] = lm.loglikelihood(reqs)
            best[name] = min(best[name], time.perf_counter() - t)
    rates = {name: len(reqs) / b for name, b in best.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(scores["llama-pretrain"], scores["transformers"]))
    print(f"preset {args.preset}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"{len(reqs)} requests ({args.questions} contexts x 4 choices), batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; max |Δ log-lik| {diff:.2e}")
    for name, r in rates.items():
        print(f"{name:<15} {r:8.1f} requests/s")
    print(f"ratio llama-pretrain / transformers: {rates['llama-pretrain'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
