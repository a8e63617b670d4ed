"""The split and plan stages: which kept documents go to validation, which training documents
each mixture pass copies, the accounting, and which documents land in which shard.

The decisions equal the in-memory ones (mixture.py) over all kept documents in global order:

* validation: ``u(hash) < val_fraction``; when that leaves it empty (and two documents or more
  are kept) the first document with the smallest ``u`` goes there; when it takes everything, the
  first with the largest ``u`` goes back to training;
* a partial pass of a source (weight 2.4: the .4) takes its training documents in the order of
  ``v(hash)`` (then global position) until their tokens come nearest to the target. The plan finds
  that cut-off from a histogram of ``v`` and one bucket's documents, not from a global sort.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError
from ...fsutil import atomic_file
from ..drops import Stats, top_reasons
from ..mixture import _unit_values
from .context import Phase2
from .dedup import REASONS, unit_doc_index, unit_drops

BUCKETS = 1 << 16  # histogram buckets of v when looking for a partial pass's cut-off


def _passes(weight: float) -> tuple[int, float]:
    """Full copies and the fraction of a partial one (as ``mixture.copy_masks`` counts them)."""
    full = int(math.floor(weight + 1e-9))
    return full, weight - full


# ---------------------------------------------------------------------------------------------
# split: per unit


def split_paths(ctx: Phase2, k: int) -> tuple[Path, Path]:
    base = ctx.work / "split" / f"{k:08d}"
    return base.with_suffix(".npz"), base.with_suffix(".json")


def run_split(ctx: Phase2, k: int) -> None:
    lengths, hashes, _ = unit_doc_index(ctx, k)
    idx, reasons = unit_drops(ctx, k)
    st = copy.deepcopy(ctx.units[k].stats)
    for i, r in zip(idx.tolist(), reasons.tolist()):
        st.drop_kept(REASONS[r], int(lengths[i]))
    keep = np.ones(len(lengths), dtype=bool)
    keep[idx] = False
    kept = np.flatnonzero(keep)
    h = hashes[kept]
    cfg, src = ctx.cfg, ctx.cfg.sources[ctx.units[k].source]
    u = _unit_values(h, cfg.seed) if cfg.val_fraction > 0 else np.zeros(0)
    v = _unit_values(h, cfg.seed + 1) if _passes(src.weight)[1] > 1e-9 else np.zeros(0)
    arrays, meta = split_paths(ctx, k)
    with atomic_file(arrays, durable=False) as fh:
        np.savez(fh, kept=kept.astype("<u8"), lengths=lengths[kept].astype("<u4"), u=u, v=v)
    ctx.write_json(meta, asdict(st))


class UnitDocs:
    """A unit's kept documents after the split stage, with the plan's decisions applied."""

    def __init__(self, ctx: Phase2, k: int, plan: dict | None):
        arrays, meta = split_paths(ctx, k)
        with np.load(arrays, allow_pickle=False) as z:
            self.kept, self.lengths, self.u, self.v = z["kept"], z["lengths"], z["u"], z["v"]
        self.k, self.ctx = k, ctx
        self.stats = Stats(**ctx.read_json(meta))
        self.val = np.zeros(len(self.kept), dtype=bool)
        if plan is not None:
            self.apply(plan)

    def apply(self, plan: dict) -> None:
        if len(self.u) and plan["val_total"]:
            self.val = self.u < self.ctx.cfg.val_fraction
        for want, at in (("val", plan["force_val"]), ("train", plan["force_train"])):
            if at is not None and at[0] == self.k:
                self.val[at[1]] = want == "val"

    def positions(self, kind: str, plan: dict | None = None) -> np.ndarray:
        """Positions (into ``kept``) of the validation, training, or partial-pass documents."""
        if kind == "val":
            return np.flatnonzero(self.val)
        train = np.flatnonzero(~self.val)
        if kind == "full":
            return train
        cut = plan["cutoffs"][str(self.ctx.units[self.k].source)] if plan else None
        if cut is None:
            return train[:0]
        if cut == "all":
            return train
        v, k, pos, inclusive = cut
        tv = self.v[train]
        at_or_before = (train < pos) | (inclusive & (train == pos))  # within the cut-off's unit
        before = (tv < v) | ((tv == v) & ((self.k < k) | ((self.k == k) & at_or_before)))
        return train[before]


# ---------------------------------------------------------------------------------------------
# plan: one task, a few passes over the split stage's small files


def run_plan(ctx: Phase2) -> dict:
    plan: dict[str, Any] = _validation_plan(ctx)
    plan["cutoffs"] = {str(si): _cutoff(ctx, plan, si) for si, src in enumerate(ctx.cfg.sources)
                       if _passes(src.weight)[1] > 1e-9}
    plan.update(_layout(ctx, plan))
    return plan


def _validation_plan(ctx: Phase2) -> dict:
    """How many kept documents there are and the forced validation/training documents."""
    total = val = 0
    lo: tuple[float, int, int] | None = None
    hi: tuple[float, int, int] | None = None
    for k in range(len(ctx.units)):
        d = UnitDocs(ctx, k, None)
        total += len(d.kept)
        if not len(d.u):
            continue
        val += int((d.u < ctx.cfg.val_fraction).sum())
        i, j = int(np.argmin(d.u)), int(np.argmax(d.u))
        if lo is None or d.u[i] < lo[0]:
            lo = (float(d.u[i]), k, i)
        if hi is None or d.u[j] > hi[0]:
            hi = (float(d.u[j]), k, j)
    plan: dict[str, Any] = {"val_total": total if ctx.cfg.val_fraction > 0 else 0,
                            "force_val": None, "force_train": None}
    if plan["val_total"] and lo is not None and hi is not None:
        if val == 0 and total >= 2:
            plan["force_val"], val = [lo[1], lo[2]], 1
        if val == total:
            plan["force_train"] = [hi[1], hi[2]]
    return plan


def _source_units(ctx: Phase2, si: int) -> list[int]:
    return [k for k, u in enumerate(ctx.units) if u.source == si]


def _cutoff(ctx: Phase2, plan: dict, si: int):
    """The last document (v, unit, position, inclusive) a partial pass of source ``si`` takes,
    "all", or None (no training documents)."""
    frac = _passes(ctx.cfg.sources[si].weight)[1]
    hist = np.zeros(BUCKETS, dtype=np.int64)
    for k in _source_units(ctx, si):
        d = UnitDocs(ctx, k, plan)
        t = d.positions("full")
        hist += np.bincount(_bucket(d.v[t]), weights=d.lengths[t], minlength=BUCKETS).astype(np.int64)
    tokens = int(hist.sum())
    if not tokens:  # no training documents (each has at least its BOS and EOS)
        return None
    target = frac * float(tokens)
    ends = np.cumsum(hist)
    b = int(np.searchsorted(ends, target, side="right"))  # the first bucket ending past the target
    if b >= BUCKETS:
        return "all"
    base = int(ends[b - 1]) if b else 0
    docs: list[tuple[float, int, int, int]] = []  # (v, unit, position, length) of bucket b's documents
    for k in _source_units(ctx, si):
        d = UnitDocs(ctx, k, plan)
        t = d.positions("full")
        inb = t[_bucket(d.v[t]) == b]
        docs.extend(zip(d.v[inb].tolist(), [k] * len(inb), inb.tolist(), d.lengths[inb].tolist()))
    docs.sort()
    cum = base + np.cumsum([x[3] for x in docs], dtype=np.int64)
    i = int(np.searchsorted(cum.astype(np.float64), target, side="right"))
    prev = float(cum[i - 1]) if i else float(base)
    take = abs(float(cum[i]) - target) < abs(prev - target)
    v, k, pos, _ = docs[i]
    return [v, k, pos, bool(take)]


def _bucket(v: np.ndarray) -> np.ndarray:
    return np.minimum((v * BUCKETS).astype(np.int64), BUCKETS - 1)


def _segments(ctx: Phase2) -> list[tuple[str, int]]:
    """The write order: every unit's validation documents, then per source, per pass, per unit,
    the training documents the pass copies."""
    segs = [("val", k) for k in range(len(ctx.units))]
    for si, src in enumerate(ctx.cfg.sources):
        full, frac = _passes(src.weight)
        kinds = ["full"] * full + (["part"] if frac > 1e-9 else [])
        segs.extend((kind, k) for kind in kinds for k in _source_units(ctx, si))
    return segs


def _layout(ctx: Phase2, plan: dict) -> dict:
    """The accounting and each split's shards: (segment, first, end) pieces."""
    sources = [Stats() for _ in ctx.cfg.sources]
    segs, used = _segments(ctx), []  # type: list[tuple[str, int]], list[list]
    packers = {"val": _Packer(ctx.cfg.shard_tokens), "train": _Packer(ctx.cfg.shard_tokens)}
    cache: dict[int, UnitDocs] = {}
    for kind, k in segs:
        if k not in cache:
            cache.clear()
            cache[k] = UnitDocs(ctx, k, plan)
            if kind == "val":
                _count_unit(sources[ctx.units[k].source], cache[k])
        d = cache[k]
        pos = d.positions(kind, plan)
        if not len(pos):
            continue
        if kind != "val":
            s = sources[ctx.units[k].source]
            s.tokens_after_mixing += int(d.lengths[pos].sum())
            s.train_documents_after_mixing += len(pos)
        packers["val" if kind == "val" else "train"].add(len(used), d.lengths[pos])
        used.append([kind, k])
    total, warnings = check_accounting(ctx, sources)
    return {"segments": used, "shards": {sp: p.close() for sp, p in packers.items()},
            "sources": [asdict(s) for s in sources], "total": asdict(total), "warnings": warnings}


def _count_unit(s: Stats, d: UnitDocs) -> None:
    s.add(d.stats)
    s.val_documents += int(d.val.sum())
    s.val_tokens += int(d.lengths[d.val].sum())


def check_accounting(ctx: Phase2, sources: list[Stats]) -> tuple[Stats, list[str]]:
    """The total, checked to add up, and the warnings. A ``UserError`` when nothing is left (with
    ``strict``, when any source is left empty), before any shard is written."""
    total = Stats()
    warnings = []
    for src, s in zip(ctx.cfg.sources, sources):
        s.check(f"source {src.name}")
        total.add(s)
        if s.documents_kept == 0 and s.files:
            msg = f"source {src.name}: no documents left after filtering"
            if ctx.strict:
                raise UserError(msg + " (" + top_reasons(s.dropped) + ")")
            warnings.append(msg)
    total.check("total")
    if not total.documents_kept:
        raise UserError("no documents left after filtering (" + (top_reasons(total.dropped) or "no input") + ")")
    return total, warnings


class _Packer:
    """Shard boundaries as ``ShardWriter`` draws them: a document goes to a new shard when it
    would overflow a non-empty one."""

    def __init__(self, cap: int):
        self.cap = int(cap)
        self.shards: list[dict] = []
        self.cur: dict | None = None

    def add(self, seg: int, lengths: np.ndarray) -> None:
        lengths = lengths.astype(np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        i = 0
        while i < len(lengths):
            if self.cur is not None and self.cur["tokens"] and self.cur["tokens"] + int(lengths[i]) > self.cap:
                self.shards.append(self.cur)
                self.cur = None
            if self.cur is None:
                self.cur = {"pieces": [], "tokens": 0, "documents": 0}
            c = self.cur
            j = max(i + 1, int(np.searchsorted(ends, self.cap - c["tokens"] + starts[i], side="right")))
            c["pieces"].append([seg, i, j])
            c["tokens"] += int(ends[j - 1] - starts[i])
            c["documents"] += j - i
            i = j

    def close(self) -> list[dict]:
        if self.cur is not None:
            self.shards.append(self.cur)
            self.cur = None
        return self.shards
