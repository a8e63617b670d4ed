"""Encode throughput: ``Tokenizer.encode_batch`` at 1 and 2 workers vs sentencepiece's own
single-process encode (one ``encode`` call per text) on the same text.

    python benchmarks/bench_tokenizer.py [--mb 20] [--vocab 8000] [--model FILE.model]

Without --model a tokenizer is trained with Llama's spec on a generated corpus (a few seconds).
Prints MB/s and tokens/s per method and each method's ratio to sentencepiece.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def make_texts(mb: float, seed: int = 0) -> list[str]:
    """English-like documents of ~2 KB: a Zipfian vocabulary, numbers, punctuation, newlines."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5,
               1, .8, .2, .2, .1, .1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(1, 10))) for _ in range(20000)]
    zipf = [1 / (i + 1) for i in range(len(words))]
    texts, size = [], 0
    while size < mb * 1e6:
        parts = rng.choices(words, zipf, k=rng.randint(200, 500))
        for i in range(0, len(parts), 13):
            parts[i] = parts[i].capitalize()
        for i in range(7, len(parts), 17):
            parts[i] += rng.choice([",", ".", ".\n", ";", " " + str(rng.randint(0, 10**6))])
        text = " ".join(parts)
        texts.append(text)
        size += len(text.encode())
    return texts


def bench(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="MB of text to encode (default 20)")
    ap.add_argument("--vocab", type=int, default=8000, help="vocab of the trained model (default 8000)")
    ap.add_argument("--model", help="use this .model instead of training one")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the best is reported")
    args = ap.parse_args()

    import sentencepiece as spm

    from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

    texts = make_texts(args.mb)
    nbytes = sum(len(t.encode()) for t in texts)
    if args.model:
        model = Path(args.model)
    else:
        model = Path(tempfile.mkdtemp()) / "bench.model"
        train_tokenizer(texts[: max(1, len(texts) // 4)], model, args.vocab, progress=False)
    tok = Tokenizer(model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    print(f"{len(texts)} texts, {nbytes / 1e6:.1f} MB, model {model.name} vocab {tok.vocab_size}, "
          f"best of {args.reps}", file=sys.stderr)

    tok.encode_batch(texts[:200], workers=2)  # start the pool outside the timing
    rows = []
    t_ref, ref = bench(lambda: [[sp.bos_id()] + sp.encode(t) for t in texts], args.reps)
    ntok = sum(map(len, ref))
    rows.append(("sentencepiece encode (1 proc)", t_ref))
    for w in (1, 2):
        t, out = bench(lambda w=w: tok.encode_batch(texts, workers=w), args.reps)
        assert out == ref, "encode_batch ids differ from sentencepiece's"
        rows.append((f"encode_batch workers={w}", t))
    tok.close()

    print(f"{'method':32s} {'MB/s':>8s} {'Mtok/s':>8s} {'ratio':>6s}")
    for name, t in rows:
        print(f"{name:32s} {nbytes / t / 1e6:8.2f} {ntok / t / 1e6:8.3f} {t_ref / t:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
