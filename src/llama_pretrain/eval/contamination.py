"""Contamination analysis (Llama 2, appendix A.6) by hashing token n-grams.

A token of an evaluation sample is contaminated when it lies in a token n-gram of length >= L
(``min_match``) that appears both in the formatted sample and in the training data, allowing up
to ``max_mismatches`` substituted tokens that are not at the n-gram's ends. Samples are then
binned by their contaminated share: Clean (< 20%), Not clean (>= 20%), Not dirty (< 80%) and
Dirty (>= 80%).

Method (seed and extend). Every ``seed``-gram of the evaluation samples (seed = L unless given) is
hashed into a small in-memory table. The training shards are streamed in chunks from their memory
maps; each chunk's n-gram hashes are computed with a vectorised polynomial hash (uint64, wrapping)
and looked up by binary search. A hit is verified token by token, then extended left and right
along both texts while at most ``max_mismatches`` substitutions are spent; the matched span is
marked if it is at least L long. Memory is O(eval tokens + chunk), so shards far larger than RAM
work; time is linear in training tokens. With seed = L, a span whose exact runs are all shorter
than L (because mismatches break it up) is missed; a smaller ``seed`` (>= ceil((L - m) / (m + 1))
by pigeonhole) finds those too, at the cost of more hits to verify.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier

SUBSETS = {"Clean": (0.0, 0.2), "Not clean": (0.2, 1.01), "Not dirty": (0.0, 0.8), "Dirty": (0.8, 1.01)}


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of ``tokens`` (len - n + 1 values), position i -> tokens[i:i+n]."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    t = np.asarray(tokens).astype(np.uint64) + np.uint64(1)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _BASE + t[j:j + m]
    return h


class _EvalIndex:
    def __init__(self, samples: Sequence[np.ndarray], seed: int):
        hs, owners = [], []
        for s, toks in enumerate(samples):
            h = ngram_hashes(toks, seed)
            hs.append(h)
            owners.append(np.stack([np.full(len(h), s), np.arange(len(h))], 1) if len(h) else
                          np.zeros((0, 2), dtype=np.int64))
        allh = np.concatenate(hs) if hs else np.zeros(0, dtype=np.uint64)
        own = np.concatenate(owners) if owners else np.zeros((0, 2), dtype=np.int64)
        order = np.argsort(allh, kind="stable")
        self.hashes = allh[order]
        self.owners = own[order]

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For chunk hashes h: (chunk positions that hit, first and end index into self.owners)."""
        if not len(self.hashes):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        lo = np.searchsorted(self.hashes, h, side="left")
        hit = lo < len(self.hashes)
        hit[hit] = self.hashes[lo[hit]] == h[hit]
        pos = np.nonzero(hit)[0]
        hi = np.searchsorted(self.hashes, h[pos], side="right")
        return pos, lo[pos], hi


def _extend(ev: np.ndarray, e0: int, tr: np.ndarray, t0: int, seed: int, budget: int) -> tuple[int, int]:
    """Grow the exact match ev[e0:e0+seed] == tr[t0:t0+seed] both ways, spending at most ``budget``
    substitutions, each one followed by a match (so neither end is a mismatch)."""
    hi, used, i, j = e0 + seed, 0, e0 + seed, t0 + seed
    while i < len(ev) and j < len(tr):
        if ev[i] == tr[j]:
            hi = i + 1
        else:
            used += 1
            if used > budget:
                break
        i, j = i + 1, j + 1
    used = _spent(ev, tr, e0 + seed, t0 + seed, hi)  # trailing mismatches past `hi` are not kept
    lo, i, j = e0, e0 - 1, t0 - 1
    left = budget - used
    while i >= 0 and j >= 0:
        if ev[i] == tr[j]:
            lo = i
        else:
            left -= 1
            if left < 0:
                break
        i, j = i - 1, j - 1
    return lo, hi


def _spent(ev, tr, i0: int, j0: int, hi: int) -> int:
    """Mismatches inside ev[i0:hi] against tr[j0:...] (those the right extension kept)."""
    n = hi - i0
    if n <= 0:
        return 0
    return int(np.count_nonzero(np.asarray(ev[i0:hi]) != np.asarray(tr[j0:j0 + n])))


def find_contamination(samples: Sequence[np.ndarray], streams: Iterable[np.ndarray], min_match: int = 10,
                       max_mismatches: int = 4, seed: int | None = None, chunk_tokens: int = 1 << 22,
                       progress: bool = False, total_tokens: int | None = None) -> list[np.ndarray]:
    """Per sample, a boolean mask of its contaminated tokens (see the module docstring).

    ``streams`` are 1-D token arrays (``np.memmap`` shards); they are read ``chunk_tokens`` at a
    time and never loaded whole.
    """
    from tqdm.auto import tqdm

    seed = seed or min_match
    if seed > min_match:
        raise ValueError("seed must be <= min_match")
    samples = [np.asarray(s, dtype=np.int64) for s in samples]
    marks = [np.zeros(len(s), dtype=bool) for s in samples]
    index = _EvalIndex(samples, seed)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="scan shards", disable=not progress)
    for tr in streams:
        N = len(tr)
        for start in range(0, max(0, N - seed + 1), chunk_tokens):
            stop = min(N, start + chunk_tokens + seed - 1)
            block = np.asarray(tr[start:stop])
            h = ngram_hashes(block, seed)
            pos, lo, hi = index.lookup(h)
            for p, a, b in zip(pos.tolist(), lo.tolist(), hi.tolist()):
                t0 = start + p
                for s, e0 in index.owners[a:b].tolist():
                    ev = samples[s]
                    if not np.array_equal(ev[e0:e0 + seed], block[p:p + seed]):
                        continue  # hash collision
                    if seed == min_match and max_mismatches == 0:
                        marks[s][e0:e0 + seed] = True
                        continue
                    first, end = _extend(ev, e0, tr, t0, seed, max_mismatches)
                    if end - first >= min_match:
                        marks[s][first:end] = True
            bar.update(stop - start - (seed - 1 if stop < N else 0))
    bar.close()
    return marks


def subset_of(share: float) -> list[str]:
    return [name for name, (a, b) in SUBSETS.items() if a <= share < b]


def summarize(ids: Sequence[str], marks: Sequence[np.ndarray], scores: dict[str, float] | None = None) -> dict:
    """Per-sample shares and the four subsets (size, and mean score when ``scores`` is given)."""
    rows: list[dict[str, Any]] = []
    for i, m in zip(ids, marks):
        share = float(m.mean()) if len(m) else 0.0
        rows.append({"id": i, "tokens": int(len(m)), "contaminated_tokens": int(m.sum()),
                     "share": share, "subsets": subset_of(share)})
    subsets = {}
    for name in SUBSETS:
        members = [r for r in rows if name in r["subsets"]]
        entry: dict[str, Any] = {"n": len(members), "fraction": len(members) / len(rows) if rows else 0.0}
        if scores is not None:
            vals = [scores[r["id"]] for r in members if r["id"] in scores]
            entry["score"] = sum(vals) / len(vals) if vals else None
            entry["scored"] = len(vals)
        subsets[name] = entry
    out: dict[str, Any] = {"samples": rows, "subsets": subsets}
    if scores is not None:
        vals = [scores[r["id"]] for r in rows if r["id"] in scores]
        out["score_all"] = sum(vals) / len(vals) if vals else None
    return out
