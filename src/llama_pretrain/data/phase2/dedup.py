"""Exact and near dedup out of core: keys per unit, duplicates per hash range, then one streaming
pass in the global document order.

The rule is the in-memory one: walking the documents in global order, a document is an exact
duplicate when an earlier document has its exact key; otherwise it is a near duplicate when it
shares an LSH band (all ``rows`` values of the band equal) with an earlier document that was kept.
Exact keys are 64-bit hashes, as before. Band keys are 64-bit hashes of the band's values used to
find candidates; a candidate group is then split by the values themselves, so a hash collision
never merges two bands.
"""

from __future__ import annotations

import bisect
import heapq
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...fsutil import atomic_file
from .. import drops
from .context import UNIT_BITS, Phase2, doc_ids, unit_span

# A record of the dedup stage's output: (document id, group, kind) as three uint64; kind EXACT
# marks an exact duplicate (group 0), MEMBER / LAST a member of a near group (LAST: its last).
# A near group is its first document and its band: the band goes in kind's upper bits
# (band << 2 | MEMBER or LAST), since a document id leaves too few bits for any number of bands.
MEMBER, LAST, EXACT = 0, 1, 2
EXACT_DROP, NEAR_DROP = 1, 2  # the reasons in resolve's drops file
REASONS = {EXACT_DROP: drops.EXACT_DUPLICATE, NEAR_DROP: drops.NEAR_DUPLICATE}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def band_keys(sigs: np.ndarray, band: int, rows: int) -> np.ndarray:
    """A 64-bit key per signature for one band (its ``rows`` uint32 values mixed)."""
    with np.errstate(over="ignore"):
        h = np.full(len(sigs), np.uint64(band + 1) * _GOLDEN, dtype=np.uint64)
        for r in range(band * rows, (band + 1) * rows):
            h ^= sigs[:, r].astype(np.uint64)
            h *= _GOLDEN
            h ^= h >> np.uint64(29)
        return _fmix64(h)


def read_doc_index(dir: Path, n: int, perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A unit's ``n`` document lengths, hashes and (with ``perm`` > 0) MinHash signatures."""
    lengths = np.fromfile(dir / "lengths.bin", dtype="<u4")
    hashes = np.fromfile(dir / "hashes.bin", dtype="<u8")
    if len(lengths) != n or len(hashes) != n:
        raise UserError(f"{dir}: work files are incomplete; delete that directory and re-run")
    sigs = np.fromfile(dir / "minhash.bin", dtype="<u4").reshape(-1, perm) if perm and n else None
    return lengths, hashes, sigs


def unit_doc_index(ctx: Phase2, k: int, with_sigs: bool = False):
    """Unit ``k``'s lengths and exact hashes (and MinHash signatures)."""
    u = ctx.units[k]
    return read_doc_index(u.dir, u.stats.documents_kept, ctx.perm if with_sigs else 0)


# ---------------------------------------------------------------------------------------------
# keys: per unit, its records sorted by partition


def keys_paths(ctx: Phase2, k: int) -> tuple[Path, Path]:
    base = ctx.work / "keys" / f"{k:08d}"
    return base.with_suffix(".bin"), base.with_suffix(".idx")


def run_keys(ctx: Phase2, k: int) -> None:
    lengths, hashes, sigs = unit_doc_index(ctx, k, with_sigs=ctx.bands > 0)
    ids = doc_ids(k, len(lengths))
    keys, parts = [], []
    if ctx.exact:
        keys.append(hashes)
        parts.append(ctx.range_of(hashes))
    base = ctx.ranges * int(ctx.exact)
    for b in range(ctx.bands if sigs is not None else 0):
        bk = band_keys(sigs, b, ctx.rows)
        keys.append(bk)
        parts.append(base + b * ctx.ranges + ctx.range_of(bk))
    key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    part = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    doc = np.tile(ids, len(keys))
    order = np.lexsort((doc, key, part))
    rec = np.empty((len(order), 2), dtype="<u8")
    rec[:, 0], rec[:, 1] = key[order], doc[order]
    offsets = np.searchsorted(part[order], np.arange(ctx.partitions + 1)).astype("<u8")
    data, index = keys_paths(ctx, k)
    with atomic_file(data, durable=False) as fh:
        fh.write(rec.tobytes())
    with atomic_file(index, durable=False) as fh:
        fh.write(offsets.tobytes())


def _partition_records(ctx: Phase2, p: int) -> np.ndarray:
    """Every unit's (key, document) records of partition ``p``, sorted by key then document."""
    pieces = []
    for k in range(len(ctx.units)):
        data, index = keys_paths(ctx, k)
        off = np.fromfile(index, dtype="<u8", count=2, offset=8 * p)
        n = int(off[1] - off[0])
        if n:
            pieces.append(np.fromfile(data, dtype="<u8", count=2 * n, offset=16 * int(off[0])).reshape(n, 2))
    rec = np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype="<u8")
    return rec[np.lexsort((rec[:, 1], rec[:, 0]))]


# ---------------------------------------------------------------------------------------------
# dedup: per partition, exact duplicates or near groups


def dedup_path(ctx: Phase2, p: int) -> Path:
    return ctx.work / "dedup" / f"{p:06d}.bin"


def run_dedup(ctx: Phase2, p: int) -> None:
    rec = _partition_records(ctx, p)
    kind, band = ctx.partition_kind(p)
    out = _exact_drops(rec) if kind == "exact" else _near_groups(ctx, rec, band)
    out = out[np.lexsort((out[:, 1], out[:, 0]))] if len(out) else out
    with atomic_file(dedup_path(ctx, p), durable=False) as fh:
        fh.write(np.ascontiguousarray(out, dtype="<u8").tobytes())


def _exact_drops(rec: np.ndarray) -> np.ndarray:
    """Every document whose key an earlier document has (records sorted by key, then document)."""
    dup = np.zeros(len(rec), dtype=bool)
    dup[1:] = rec[1:, 0] == rec[:-1, 0]
    out = np.zeros((int(dup.sum()), 3), dtype="<u8")
    out[:, 0], out[:, 2] = rec[dup, 1], EXACT
    return out


def _runs(same_as_previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of rows (``same_as_previous[i]``: row i continues row i-1's run)."""
    starts = np.flatnonzero(~same_as_previous)
    ends = np.append(starts[1:], len(same_as_previous))
    return starts, ends


def _near_groups(ctx: Phase2, rec: np.ndarray, band: int) -> np.ndarray:
    """The members of every group of two or more documents whose band values are equal."""
    same = np.zeros(len(rec), dtype=bool)
    same[1:] = rec[1:, 0] == rec[:-1, 0]
    starts, ends = _runs(same)
    multi = ends - starts > 1
    if not multi.any():
        return np.zeros((0, 3), dtype="<u8")
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts[multi], ends[multi])])
    cand = rec[rows]
    vals = _band_values(ctx, cand[:, 1], band)
    # Split the candidates by their band's values (then by document, to keep global order).
    order = np.lexsort((cand[:, 1], *vals.T[::-1], cand[:, 0]))
    cand, vals = cand[order], vals[order]
    same = np.zeros(len(cand), dtype=bool)
    same[1:] = (cand[1:, 0] == cand[:-1, 0]) & (vals[1:] == vals[:-1]).all(axis=1)
    starts, ends = _runs(same)
    size = ends - starts
    keep = np.repeat(size > 1, size)
    first = np.repeat(cand[starts, 1], size)
    last = np.zeros(len(cand), dtype=bool)
    last[ends - 1] = True
    out = np.empty((int(keep.sum()), 3), dtype="<u8")
    out[:, 0] = cand[keep, 1]
    out[:, 1] = first[keep]
    out[:, 2] = (band << 2) | np.where(last[keep], LAST, MEMBER)
    return out


def _band_values(ctx: Phase2, docs: np.ndarray, band: int) -> np.ndarray:
    """The ``rows`` signature values of ``band`` for each document, read from its unit's file."""
    out = np.empty((len(docs), ctx.rows), dtype="<u4")
    units = (docs >> np.uint64(UNIT_BITS)).astype(np.int64)
    local = (docs & np.uint64((1 << UNIT_BITS) - 1)).astype(np.int64)
    for k in np.unique(units):
        u = ctx.units[int(k)]
        sigs = np.memmap(u.dir / "minhash.bin", dtype="<u4", mode="r").reshape(-1, ctx.perm)
        sel = units == k
        out[sel] = sigs[local[sel], band * ctx.rows:(band + 1) * ctx.rows]
    return out


# ---------------------------------------------------------------------------------------------
# resolve: the global order, one unit at a time


def drops_path(ctx: Phase2) -> Path:
    return ctx.work / "resolve" / "drops.bin"


class _Column:
    """Column 0 of a memory-mapped record file as a sequence for ``bisect``: a search reads a few
    records (``np.searchsorted`` would copy the strided column first)."""

    def __init__(self, m: np.ndarray):
        self.m = m

    def __len__(self) -> int:
        return len(self.m)

    def __getitem__(self, i: int) -> int:
        return int(self.m[i, 0])


def _first_at_or_after(m: np.ndarray, value: int, lo: int = 0) -> int:
    return bisect.bisect_left(_Column(m), value, lo)


class _Cursors:
    """Reads each dedup partition's records (sorted by document) one unit at a time. A heap of each
    partition's next document finds the partitions with records for a unit without visiting the
    others, and a partition is read a chunk at a time by offset (no file stays open: there may be
    thousands), holding at most one chunk of records of later units."""

    CHUNK = 256  # records

    def __init__(self, ctx: Phase2):
        self.paths: list[tuple[Path, int]] = []
        self.pos: list[int] = []
        self.rest: list[np.ndarray] = []
        self.heap: list[tuple[int, int]] = []
        for p in range(ctx.partitions):
            path = dedup_path(ctx, p)
            n = path.stat().st_size // 24
            if n:
                self.paths.append((path, n))
                self.pos.append(0)
                self.rest.append(np.zeros((0, 3), dtype="<u8"))
                self._refill(len(self.paths) - 1)

    def _read_chunk(self, i: int) -> None:
        path, n = self.paths[i]
        count = min(self.CHUNK, n - self.pos[i])
        self.rest[i] = np.fromfile(path, dtype="<u8", count=3 * count, offset=24 * self.pos[i]).reshape(-1, 3)
        self.pos[i] += count

    def _refill(self, i: int) -> None:
        """Push partition ``i``'s next record onto the heap (reading a chunk when none is held)."""
        if not len(self.rest[i]) and self.pos[i] < self.paths[i][1]:
            self._read_chunk(i)
        if len(self.rest[i]):
            heapq.heappush(self.heap, (int(self.rest[i][0, 0]), i))

    def unit(self, k: int) -> np.ndarray:
        _, hi = unit_span(k)
        pieces = []
        while self.heap and self.heap[0][0] < int(hi):
            _, i = heapq.heappop(self.heap)
            while True:
                r = self.rest[i]
                cut = int(np.searchsorted(r[:, 0], hi))
                pieces.append(r[:cut])
                self.rest[i] = r[cut:]
                if cut < len(r) or self.pos[i] >= self.paths[i][1]:
                    break
                self._read_chunk(i)
            self._refill(i)
        if not pieces:
            return np.zeros((0, 3), dtype="<u8")
        rec = np.concatenate(pieces)
        return rec[np.lexsort((rec[:, 2], rec[:, 1], rec[:, 0]))]


def run_resolve(ctx: Phase2, bar=None) -> None:
    cursors = _Cursors(ctx)
    claimed: set[int] = set()  # near groups with a kept member and members still to come
    with atomic_file(drops_path(ctx), durable=False) as fh:
        for k in range(len(ctx.units)):
            out = _resolve_unit(cursors.unit(k), claimed)
            fh.write(np.asarray(out, dtype="<u8").reshape(-1, 2).tobytes())
            if bar is not None:
                bar.update(1)


def _resolve_unit(rec: np.ndarray, claimed: set[int]) -> list[tuple[int, int]]:
    """The unit's duplicates as (document, reason), in document order; updates ``claimed``."""
    out: list[tuple[int, int]] = []
    docs, kinds = rec[:, 0].tolist(), (rec[:, 2] & np.uint64(3)).tolist()
    # a group as one Python int, (first document << 32) | band: no tuple per claimed group
    groups = [(f << 32) | b for f, b in zip(rec[:, 1].tolist(), (rec[:, 2] >> np.uint64(2)).tolist())]
    i, n = 0, len(docs)
    while i < n:
        j = i
        while j < n and docs[j] == docs[i]:
            j += 1
        mine = range(i, j)
        if any(kinds[t] == EXACT for t in mine):  # not indexed, not checked
            out.append((docs[i], EXACT_DROP))
        elif any(groups[t] in claimed for t in mine):
            out.append((docs[i], NEAR_DROP))
        else:
            claimed.update(groups[t] for t in mine if kinds[t] == MEMBER)
        for t in mine:
            if kinds[t] == LAST:
                claimed.discard(groups[t])
        i = j
    return out


def unit_drops(ctx: Phase2, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit ``k``'s duplicates: their indices in the unit and their reasons."""
    m = np.memmap(drops_path(ctx), dtype="<u8", mode="r").reshape(-1, 2) if drops_path(ctx).stat().st_size \
        else np.zeros((0, 2), dtype="<u8")
    lo, hi = unit_span(k)
    a = _first_at_or_after(m, int(lo))
    rec = np.asarray(m[a:_first_at_or_after(m, int(hi), a)])
    return (rec[:, 0] - lo).astype(np.int64), rec[:, 1].astype(np.int64)
