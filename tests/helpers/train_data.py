"""Tiny prepared datasets for the training tests (written in the shard format the loader reads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llama_pretrain.data.shards import FORMAT, MANIFEST, ShardWriter


def make_dataset(out: Path, vocab_size: int = 512, train_tokens: int = 40_000, val_tokens: int = 4_000,
                 seed: int = 0, tokenizer_sha256: str = "test-tokenizer") -> Path:
    """A dataset of documents drawn from a sparse random Markov chain (learnable, so loss falls)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(3, vocab_size, size=(vocab_size, 4))
    out = Path(out)
    splits = {}
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        writer = ShardWriter(out, split, "uint16", shard_tokens=total // 3 + 1)
        n = 0
        while n < total:
            length = int(rng.integers(20, 200))
            doc = [1, int(rng.integers(3, vocab_size))]
            for _ in range(length):
                doc.append(int(successors[doc[-1], rng.integers(0, 4)]))
            doc.append(2)
            writer.add(np.asarray(doc))
            n += len(doc)
        shards = writer.close()
        splits[split] = {"shards": shards, "tokens": sum(s["tokens"] for s in shards),
                         "documents": sum(s["documents"] for s in shards)}
    manifest = {"format": FORMAT, "dtype": "uint16",
                "tokenizer": {"vocab_size": vocab_size, "sha256": tokenizer_sha256}, "splits": splits}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def fit_on_tokens(model, ids, steps: int, lr: float = 3e-3, batch: int = 16, seq: int = 64) -> None:
    """A few quick AdamW steps on random windows of ``ids`` (a 1-D tensor), so a tiny model's
    greedy text is words rather than random pieces."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - seq - 1, (batch,))
        rows = torch.stack([ids[s:s + seq + 1] for s in start])
        loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
