"""Throughput of `data prepare`: the full pipeline and tokenisation alone, at 1 and 2 workers,
against sentencepiece's bare encode of the same texts (the peer).

    python benchmarks/bench_data.py [--files 8 --docs 1500]

Prints documents/s and tokens/s (total and per worker) and the ratio to bare sentencepiece.
The pipeline numbers include reading JSONL, writing work files, the sequential dedup/write phase
and process start-up, so they are end-to-end wall-clock figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_text import prose  # noqa: E402





def document(rng: random.Random) -> str:
    return prose(rng, sentences=rng.randint(12, 40), per_para=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--docs", type=int, default=1500, help="documents per file")
    args = ap.parse_args()

    import sentencepiece as spm

    from llama_pretrain.data.prepare import prepare
    from llama_pretrain.data.sources import QUALITY_STAGES, DataConfig, SourceConfig
    from llama_pretrain.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rng = random.Random(0)
    texts = []
    for i in range(args.files):
        docs = [document(rng) for _ in range(args.docs)]
        texts += docs
        (tmp / f"in{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = tmp / "tok.model"
    train_tokenizer(texts[:2000], tok, 1000, progress=False)
    mb = sum(map(len, texts)) / 1e6
    print(f"corpus: {len(texts):,} documents, {mb:.1f} MB of text, {args.files} files; tokenizer vocab 1000")

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    rows = []
    for threads in (1, 2):
        t0 = time.perf_counter()
        ids = sp.encode(texts, add_bos=True, add_eos=True, num_threads=threads)
        dt = time.perf_counter() - t0
        ntok = sum(map(len, ids))
        rows.append(("sentencepiece encode (bare)", threads, len(texts) / dt, ntok / dt))
    base_per_worker = rows[0][3]

    def run(name: str, cfg: DataConfig, workers: int) -> None:
        out = tmp / f"out_{name.replace(' ', '_')}_{workers}"
        t0 = time.perf_counter()
        m = prepare(cfg, tok, out, workers=workers, progress=False)
        dt = time.perf_counter() - t0
        rows.append((name, workers, m["total"]["documents_in"] / dt, m["total"]["tokens"] / dt))

    full = DataConfig([SourceConfig("bench", [str(tmp / "in*.jsonl")])], val_fraction=0.01)
    bare = DataConfig([SourceConfig("bench", [str(tmp / "in*.jsonl")], quality=False)], val_fraction=0.01)
    for stage in ("normalize", "blocklist", "exact_dedup", "near_dedup", *QUALITY_STAGES):
        getattr(bare.stages, stage).enabled = False
    for w in (1, 2):
        run("prepare: tokenisation only", bare, w)
    for w in (1, 2):
        run("prepare: full pipeline", full, w)

    print(f"{'what':<30} {'workers':>7} {'docs/s':>10} {'tokens/s':>12} {'tok/s/worker':>13} {'ratio':>7}")
    for name, w, ds, ts in rows:
        print(f"{name:<30} {w:>7} {ds:>10,.0f} {ts:>12,.0f} {ts / w:>13,.0f} {ts / w / base_per_worker:>7.3f}")
    print("ratio = tokens/s per worker divided by bare sentencepiece (1 thread) tokens/s")


if __name__ == "__main__":
    main()
