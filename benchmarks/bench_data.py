"""Throughput of `data prepare`: the full pipeline and tokenisation alone, at 1 and 2 workers,
against sentencepiece's bare encode of the same texts (the peer).

    python benchmarks/bench_data.py [--files 8 --docs 1500 --repeat 2 --vocab small|varied]

Prints documents/s and tokens/s (total and per worker), the ratio to bare sentencepiece, the
2-worker / 1-worker speed-up, and the load average before and after (the speed-up only means
something on an otherwise idle machine). Each row is the best of ``--repeat`` runs, which filters
out some of the noise of a shared machine. The pipeline numbers include reading JSONL, writing
work files, the sequential dedup/write phase and process start-up, so they are end-to-end
wall-clock figures.

``--uneven`` makes the last file as big as all the others together (real corpora are rarely
split evenly): the 2-worker speed-up then depends on the pool starting that file first.

``--cli-pairs N`` then runs ``llama-pretrain data prepare`` itself (a fresh process per run, as a
user starts it, start-up included) with ``--workers 1`` and ``--workers 2`` alternately N times,
and prints each pair's speed-up with the load average at its start.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.synthetic_text import WORDS, prose  # noqa: E402


def document(rng: random.Random) -> str:
    return prose(rng, sentences=rng.randint(12, 40), per_para=4)


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]


def varied_vocab(size: int = 50_000, seed: int = 1) -> list[str]:
    """``size`` distinct made-up words of 1-4 syllables, for text with a realistic vocabulary."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))] = None
    return list(words)


def varied_document(rng: random.Random, vocab: list[str], cum_weights: list[float]) -> str:
    """Prose whose words follow Zipf's law over ``vocab`` (web text's shape: a few words are most
    of the text, and most words are rare), with capitals, numbers and commas."""
    paras = []
    for _ in range(rng.randint(3, 10)):
        sents = []
        for _ in range(rng.randint(2, 6)):
            w = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(6, 24))
            if rng.random() < 0.2:
                w[rng.randrange(len(w))] = str(rng.randint(0, 99999))
            if rng.random() < 0.3:
                w[rng.randrange(len(w))] += ","
            sents.append(" ".join(w).capitalize() + rng.choice(".....?!"))
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def document_for(kind: str):
    """A document maker: "small" (the default corpus, ~110 distinct words) or "varied"."""
    if kind == "small":
        return document
    # the corpus's common English words (stop words among them) first, as in real text
    vocab = list(dict.fromkeys([*WORDS, *varied_vocab()]))
    cum = list(accumulate(1 / (r + 1) for r in range(len(vocab))))  # Zipf, exponent 1
    return lambda rng: varied_document(rng, vocab, cum)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--docs", type=int, default=1500, help="documents per file")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest counts")
    ap.add_argument("--vocab", choices=("small", "varied"), default="small",
                    help="small: ~110 distinct words; varied: Zipf over 50,000 words (realistic)")
    ap.add_argument("--uneven", action="store_true",
                    help="the last file holds as many documents as all the others together")
    ap.add_argument("--cli-pairs", type=int, default=0,
                    help="also time the CLI (fresh processes), 1 then 2 workers, this many times")
    args = ap.parse_args()
    if args.uneven and args.files < 2:
        ap.error("--uneven needs --files 2 or more")
    load_before = os.getloadavg()

    import sentencepiece as spm

    from llama_pretrain.data.prepare import prepare
    from llama_pretrain.data.sources import QUALITY_STAGES, DataConfig, SourceConfig
    from llama_pretrain.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rng = random.Random(0)
    texts = []
    make = document_for(args.vocab)
    counts = [args.docs] * args.files
    if args.uneven:
        counts[-1] = args.docs * (args.files - 1)
    for i, count in enumerate(counts):
        docs = [make(rng) for _ in range(count)]
        texts += docs
        (tmp / f"in{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = tmp / "tok.model"
    train_tokenizer(texts[:2000], tok, 1000, progress=False)
    mb = sum(map(len, texts)) / 1e6
    distinct = len({w for t in texts for w in t.split()})
    uneven = "; the last file is half the corpus" if args.uneven else ""
    print(f"corpus ({args.vocab}): {len(texts):,} documents, {mb:.1f} MB of text, {args.files} files, "
          f"{distinct:,} distinct words; tokenizer vocab 1000{uneven}")

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    rows = []
    def timed(fn):
        """(result, best wall seconds, best CPU seconds of this process and its finished children)
        over ``--repeat`` runs. CPU time is what a worker costs even when other jobs share the
        machine (wall time then counts their turns too)."""
        wall = cpu = float("inf")
        for r in range(args.repeat):
            c0, t0 = os.times(), time.perf_counter()
            out = fn(r)
            t1, c1 = time.perf_counter(), os.times()
            wall = min(wall, t1 - t0)
            cpu = min(cpu, sum(c1[:4]) - sum(c0[:4]))
        return out, wall, cpu

    for threads in (1, 2):
        ids, wall, cpu = timed(lambda r, n=threads: sp.encode(texts, add_bos=True, add_eos=True, num_threads=n))
        ntok = sum(map(len, ids))
        rows.append(("sentencepiece encode (bare)", threads, len(texts) / wall, ntok / wall, ntok / cpu))
    base_per_worker, base_cpu = rows[0][3], rows[0][4]
    # Free the corpus and its ids before timing prepare: this process is one of prepare's workers,
    # and millions of live Python objects would slow its garbage collector (a real run has none).
    ids = texts = sp = None
    gc.collect()

    def run(name: str, cfg: DataConfig, workers: int) -> None:
        slug = name.replace(" ", "_").replace(":", "")
        m, wall, cpu = timed(lambda r: prepare(cfg, tok, tmp / f"out_{slug}_{workers}_{r}", workers=workers,
                                               progress=False))
        ntok = m["total"]["tokens"]
        rows.append((name, workers, m["total"]["documents_in"] / wall, ntok / wall, ntok / cpu))

    full = DataConfig([SourceConfig("bench", [str(tmp / "in*.jsonl")])], val_fraction=0.01)
    bare = DataConfig([SourceConfig("bench", [str(tmp / "in*.jsonl")], quality=False)], val_fraction=0.01)
    for stage in ("normalize", "blocklist", "exact_dedup", "near_dedup", *QUALITY_STAGES):
        getattr(bare.stages, stage).enabled = False
    for w in (1, 2):
        run("prepare: tokenisation only", bare, w)
    for w in (1, 2):
        run("prepare: full pipeline", full, w)

    print(f"{'what':<30} {'workers':>7} {'docs/s':>10} {'tokens/s':>12} {'tok/s/worker':>13} {'ratio':>7} "
          f"{'tok/CPU-s':>11} {'CPU ratio':>9}")
    for name, w, ds, ts, tc in rows:
        print(f"{name:<30} {w:>7} {ds:>10,.0f} {ts:>12,.0f} {ts / w:>13,.0f} {ts / w / base_per_worker:>7.3f} "
              f"{tc:>11,.0f} {tc / base_cpu:>9.3f}")
    print("ratio = tokens/s per worker (wall clock) divided by bare sentencepiece (1 thread) tokens/s;")
    print("CPU ratio = tokens per CPU second (all processes of the run) divided by bare sentencepiece's")
    speed = {(name, w): ts for name, w, _, ts, _ in rows}
    for name in ("prepare: tokenisation only", "prepare: full pipeline"):
        print(f"{name}: 2 workers / 1 worker = {speed[name, 2] / speed[name, 1]:.2f}x")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}; {} CPUs".format(
        *load_before, *os.getloadavg(), os.cpu_count()))
    if args.cli_pairs:
        cli_scaling(tmp, tok, args.cli_pairs)


def cli_scaling(tmp: Path, tok: Path, pairs: int) -> None:
    """``data prepare`` as a user runs it: one fresh process per run, wall clock from start to exit."""
    import shutil
    import subprocess

    def once(workers: int) -> float:
        out = tmp / f"cli_{workers}"
        cmd = [sys.executable, "-m", "llama_pretrain", "data", "prepare", "--input",
               *sorted(map(str, tmp.glob("in*.jsonl"))), "--tokenizer", str(tok), "--out", str(out),
               "--workers", str(workers), "--quiet"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        shutil.rmtree(out)
        return dt

    ratios = []
    for i in range(pairs):
        load = os.getloadavg()[0]
        one, two = once(1), once(2)
        ratios.append(one / two)
        print(f"CLI pair {i + 1}: 1 worker {one:.2f} s, 2 workers {two:.2f} s: {one / two:.2f}x "
              f"(load average {load:.2f} at the start)")
    print(f"CLI: 2 workers / 1 worker = {min(ratios):.2f}-{max(ratios):.2f}x over {pairs} pairs "
          f"(median {sorted(ratios)[len(ratios) // 2]:.2f}x)")


if __name__ == "__main__":
    main()
