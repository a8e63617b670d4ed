"""Train/validation split and mixture weights, both decided per document from its content hash.

* Split: a document goes to validation when ``xxh64(hash, seed) / 2**64 < val_fraction``. If that
  leaves the validation split empty while at least two documents are kept (tiny corpora), the
  document with the smallest such value goes there, so validation is small but never empty.
  Validation documents appear once and are not re-weighted.
* Weights: a source with weight ``w`` contributes ``floor(w)`` full copies of its training
  documents plus, for the fraction, the documents taken in a seeded hash order until their tokens
  reach ``frac * tokens`` (nearest document boundary). So 2.0 doubles the tokens exactly and 0.5
  halves them to within one document; the choice is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import xxhash


def _unit_values(hashes: np.ndarray, seed: int) -> np.ndarray:
    """A per-document uniform value in [0, 1) keyed by the content hash and the seed."""
    out = np.empty(len(hashes), dtype=np.float64)
    for i, h in enumerate(hashes.tolist()):
        out[i] = xxhash.xxh64_intdigest(int(h).to_bytes(8, "little"), seed=seed) / 2.0**64
    return out


def split_validation(hashes: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: True for validation documents."""
    if val_fraction <= 0 or len(hashes) == 0:
        return np.zeros(len(hashes), dtype=bool)
    u = _unit_values(hashes, seed)
    val = u < val_fraction
    if not val.any() and len(hashes) >= 2:
        val[int(np.argmin(u))] = True
    if val.all():  # never leave training empty
        val[int(np.argmax(u))] = False
    return val


def copy_masks(hashes: np.ndarray, lengths: np.ndarray, weight: float, seed: int) -> list[np.ndarray | None]:
    """One entry per pass over the source: ``None`` for a full copy, else a boolean mask of the
    documents in the partial copy."""
    full = int(math.floor(weight + 1e-9))
    frac = weight - full
    masks: list[np.ndarray | None] = [None] * full
    if frac > 1e-9 and len(hashes):
        target = frac * float(lengths.sum())
        order = np.argsort(_unit_values(hashes, seed + 1), kind="stable")
        cum = np.cumsum(lengths[order].astype(np.float64))
        # take documents while the running total stays nearest to the target
        k = int(np.searchsorted(cum, target, side="right"))
        if k < len(cum) and abs(cum[k] - target) < abs((cum[k - 1] if k else 0.0) - target):
            k += 1
        mask = np.zeros(len(hashes), dtype=bool)
        mask[order[:k]] = True
        masks.append(mask)
    return masks
