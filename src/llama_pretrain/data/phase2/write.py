"""The write and finish stages: one shard per item, then the manifest and the swap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ...config import parse_json
from ...fsutil import atomic_file, refusal
from ..drops import Stats
from .. import outdir
from ..shards import FORMAT, MANIFEST, PIPELINE_VERSION, ShardWriter, dtype_for_vocab, np_dtype
from .context import Phase2
from .layout import UnitDocs

COPY_TOKENS = 1 << 22  # tokens gathered from a unit's token file at a time


def plan_path(ctx: Phase2) -> Path:
    return ctx.work / "plan.json"


def shard_items(plan: dict) -> list[tuple[str, int]]:
    """The write stage's items: (split, shard index), validation first."""
    return [(sp, i) for sp in ("val", "train") for i in range(len(plan["shards"][sp]))]


def meta_path(ctx: Phase2, split: str, i: int) -> Path:
    return ctx.work / "write" / f"{split}-{i:05d}.json"


def staging(ctx: Phase2) -> Path:
    return ctx.out / outdir.STAGING


def start_staging(ctx: Phase2) -> None:
    """An empty staging dir for the write stage (what a killed run left there is ours)."""
    st = staging(ctx)
    shutil.rmtree(st, ignore_errors=True)
    for sp in ("train", "val"):
        (st / sp).mkdir(parents=True)


class _UnitCache:
    """The last units a write task read (a shard's pieces come from a few consecutive units)."""

    def __init__(self, ctx: Phase2, plan: dict):
        self.ctx, self.plan = ctx, plan
        self.docs: dict[int, UnitDocs] = {}

    def get(self, k: int) -> UnitDocs:
        if k not in self.docs:
            if len(self.docs) >= 4:
                self.docs.pop(next(iter(self.docs)))
            self.docs[k] = UnitDocs(self.ctx, k, self.plan)
        return self.docs[k]


def run_write(ctx: Phase2, plan: dict, item: int, cache: _UnitCache | None = None) -> None:
    split, i = shard_items(plan)[item]
    spec = plan["shards"][split][i]
    cache = cache or _UnitCache(ctx, plan)
    dtype = dtype_for_vocab(ctx.tokenizer["vocab_size"])
    writer = ShardWriter(staging(ctx), split, dtype, shard_tokens=spec["tokens"], first_index=i)
    try:
        for seg, a, b in spec["pieces"]:
            kind, k = plan["segments"][seg]
            d = cache.get(k)
            copy_documents(writer, ctx.units[k].dir, d.kept[d.positions(kind, plan)[a:b]], dtype)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    if len(shards) != 1 or shards[0]["tokens"] != spec["tokens"] or shards[0]["documents"] != spec["documents"]:
        raise RuntimeError(f"{split} shard {i}: wrote {shards}, the plan says {spec['tokens']} tokens")
    ctx.write_json(meta_path(ctx, split, i), shards[0])


def copy_documents(writer: ShardWriter, unit_dir: Path, docs: np.ndarray, dtype: str) -> None:
    """Append the unit's documents ``docs`` (indices into its files) to ``writer``."""
    lengths = np.fromfile(unit_dir / "lengths.bin", dtype="<u4")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    path = unit_dir / "tokens.bin"
    toks = (np.memmap(path, dtype=np_dtype(dtype), mode="r") if path.stat().st_size
            else np.zeros(0, dtype=np_dtype(dtype)))
    sel_lens = lengths[docs].astype(np.int64)
    ends = np.cumsum(sel_lens)
    c = 0
    while c < len(docs):  # about COPY_TOKENS tokens gathered at a time (at least one document)
        e = max(c + 1, int(np.searchsorted(ends, ends[c] - sel_lens[c] + COPY_TOKENS, side="right")))
        sel, lens = docs[c:e], sel_lens[c:e]
        # the token positions of these documents, back to back
        where = np.repeat(offsets[sel] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
        writer.add_many(toks[where], lens)
        c = e


def run_finish(ctx: Phase2, plan: dict) -> dict:
    """Write the manifest into staging and swap the new splits in; returns the manifest. A re-run
    after a kill during the swap (its marker set) completes the swap."""
    if ctx.is_done("swap", 0):
        with outdir.interrupts_deferred():
            outdir.swap_in(staging(ctx), ctx.out, resume=True)
            ctx.mark_done("finish", 0)
        manifest = parse_json((ctx.out / MANIFEST).read_text())
    else:
        manifest = _manifest(ctx, plan)
        for sp in ("train", "val"):  # a split with no shard has no write item to make its dir
            (staging(ctx) / sp).mkdir(parents=True, exist_ok=True)
        _drop_temporaries(ctx)
        with atomic_file(staging(ctx) / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=False)
            fh.write("\n")
        bad = outdir.dataset_foreign(ctx.out)  # something put into train/ or val/ while the shards were written
        if bad is not None:
            raise refusal(ctx.out, bad, "data prepare")
        with outdir.interrupts_deferred():  # a Ctrl-C now ends the run with the new dataset whole
            ctx.mark_done("swap", 0)
            outdir.swap_in(staging(ctx), ctx.out)
            ctx.mark_done("finish", 0)  # before the work files go: a kill while they go leaves a finished run
    _remove_work_files(ctx)
    return manifest


def _drop_temporaries(ctx: Phase2) -> None:
    """What a task killed while writing a shard or the manifest left in staging (``atomic_file``'s
    temporaries, ours by name), so that it is not swapped into the dataset."""
    st = staging(ctx)
    for p in [*st.glob(f".{MANIFEST}.tmp-*"), *st.glob("train/.[0-9]*.tmp-*"), *st.glob("val/.[0-9]*.tmp-*")]:
        p.unlink()


def _remove_work_files(ctx: Phase2) -> None:
    """Phase 2's work files (and older runs'), all but the finish marker (so that a late task of
    this run finds nothing to do)."""
    keep = ctx.marker("finish", 0)
    for d in (ctx.root, ctx.work, ctx.work / "done"):
        for p in d.iterdir():
            if p in (ctx.work, ctx.work / "done", keep.parent):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _manifest(ctx: Phase2, plan: dict) -> dict:
    shards = {sp: [ctx.read_json(meta_path(ctx, sp, i)) for i in range(len(plan["shards"][sp]))]
              for sp in ("train", "val")}
    total = Stats(**plan["total"])
    sources = [Stats(**s) for s in plan["sources"]]
    manifest = {
        "format": FORMAT,
        "pipeline_version": PIPELINE_VERSION,
        "dtype": dtype_for_vocab(ctx.tokenizer["vocab_size"]),
        "tokenizer": ctx.tokenizer,
        "config": ctx.cfg.to_dict(),
        "splits": {sp: {"tokens": int(sum(x["tokens"] for x in shards[sp])),
                        "documents": int(sum(x["documents"] for x in shards[sp])),
                        "shards": shards[sp]} for sp in ("train", "val")},
        "total": total.manifest_dict(total),
        "sources": {src.name: s.manifest_dict(total, src.weight) for src, s in zip(ctx.cfg.sources, sources)},
        "warnings": plan["warnings"],
    }
    if ctx.extra:
        manifest.update(ctx.extra)
    return manifest
