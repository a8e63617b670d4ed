"""Exact and near-duplicate detection.

* Exact: a 64-bit xxh3 hash of the text after lowercasing and collapsing whitespace.
* Near: MinHash (datasketch, xxh32 as the base hash) over word 5-grams, and datasketch's LSH
  index with 14 bands of 8 rows (FineWeb's setting): two documents collide in some band with
  probability 1 - (1 - J^8)^14, i.e. ~92% at Jaccard similarity 0.8, ~77% at 0.75, ~1% at 0.4.
  A document colliding with an earlier kept one is a near duplicate; the first occurrence wins.

Signatures are computed in the parallel workers and stored (uint32 per permutation), the LSH
index is run once, sequentially, in the global document order, so the result does not depend on
the number of workers or tasks.
"""

from __future__ import annotations

import re

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")


def exact_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(" ".join(text.lower().split()).encode("utf-8"))


def shingles(text: str, n: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


class MinHasher:
    """MinHash signatures with ``num_perm`` permutations (the permutations are made once)."""

    def __init__(self, num_perm: int, seed: int = 1, ngram: int = 5):
        from datasketch import MinHash

        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)
        self._kw = {"permutations": proto.permutations}
        self.scheme = getattr(proto, "scheme", None)
        if self.scheme is not None:  # datasketch >= 2.0 records how the values were made
            self._kw["scheme"] = self.scheme

    def signature(self, text: str) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=xxhash.xxh32_intdigest, **self._kw)
        m.update_batch(shingles(text, self.ngram))
        return np.asarray(m.hashvalues, dtype=np.uint32)


class NearDedup:
    """A datasketch ``MinHashLSH`` index with explicit (bands, rows)."""

    def __init__(self, bands: int = 14, rows: int = 8, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.bands, self.rows, self.seed = bands, rows, seed
        self.lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
        self.scheme = getattr(MinHash(num_perm=1, seed=seed), "scheme", None)
        self._n = 0

    def is_duplicate(self, signature: np.ndarray) -> bool:
        """True if ``signature`` collides with an indexed one; otherwise index it."""
        from datasketch import LeanMinHash

        kw = {"scheme": self.scheme} if self.scheme is not None else {}
        m = LeanMinHash(seed=self.seed, hashvalues=np.asarray(signature, dtype=np.uint64), **kw)
        if self.lsh.query(m):
            return True
        self.lsh.insert(self._n, m, check_duplication=False)
        self._n += 1
        return False
