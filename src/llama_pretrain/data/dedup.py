"""Exact and near-duplicate detection.

* Exact: a 64-bit xxh3 hash of the text after lowercasing and collapsing whitespace.
* Near: MinHash over word 5-grams (xxh32 as the base hash) and an LSH index with 14 bands of 8
  rows (FineWeb's setting): two documents collide in some band with probability
  1 - (1 - J^8)^14, i.e. ~92% at Jaccard similarity 0.8, ~77% at 0.75, ~1% at 0.4. A document
  colliding with an earlier kept one is a near duplicate; the first occurrence wins.

The signatures are datasketch's, bit for bit (its permutations, its scheme: "affine32" from
datasketch 2.0, "legacy" before; tests compare with datasketch's ``MinHash``), but computed for a
whole batch of documents in a few numpy operations, and the LSH index is a set of band keys per
band, which answers exactly what datasketch's ``MinHashLSH`` query-then-insert does. datasketch is
not imported at run time (its import costs each worker process half a second).

Signatures are computed in the parallel workers and stored (uint32 per permutation), the LSH
index is run once, sequentially, in the global document order, so the result does not depend on
the number of workers or tasks.
"""

from __future__ import annotations

import re
from importlib import metadata

import numpy as np
import xxhash

_WORD = re.compile(r"\w+")

_MERSENNE_PRIME = (1 << 61) - 1
_MAX_HASH = (1 << 32) - 1
# MurmurHash3's 32-bit finalizer, which datasketch's "affine32" scheme applies before permuting.
_FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)


def exact_key(text: str, lower_words: list[str] | None = None) -> int:
    """``lower_words``: ``text.lower().split()`` when the caller has it already."""
    words = text.lower().split() if lower_words is None else lower_words
    return xxhash.xxh3_64_intdigest(" ".join(words).encode("utf-8"))


def shingles(text: str, n: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    # zip of shifted lists gives the n-grams without a Python-level loop
    return list(map(str.encode, map(" ".join, zip(*(words[k:] for k in range(n))))))


def datasketch_scheme() -> str:
    """The MinHash scheme of the installed datasketch (read from its version, without importing it)."""
    try:
        major = int(metadata.version("datasketch").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return "affine32"
    return "affine32" if major >= 2 else "legacy"


def permutations(num_perm: int, seed: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's permutation parameters (a, b) for ``seed``: the same draws from the same
    ``RandomState`` stream."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        ab = np.array([(gen.randint(1, _MERSENNE_PRIME, dtype=np.uint64),
                        gen.randint(0, _MERSENNE_PRIME, dtype=np.uint64)) for _ in range(num_perm)],
                      dtype=np.uint64).T
        return ab[0], ab[1]
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)  # odd: a bijection
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> np.uint32(s1))
    h = h * np.uint32(m1)
    h = h ^ (h >> np.uint32(s2))
    h = h * np.uint32(m2)
    return h ^ (h >> np.uint32(s3))


_M32 = 0xFFFFFFFF
_P1, _P2, _P3, _P4, _P5 = (np.uint32(x) for x in (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))


def _rotl(x, r):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def xxh32_many(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """xxh32 (seed 0) of ``buf[starts[i]:starts[i] + lengths[i]]`` for every i, vectorised: the
    algorithm as its specification states it (16-byte stripes in four lanes, then 4-byte words,
    then bytes, then the avalanche), on all inputs at once; tests compare it with ``xxhash``."""
    # Inputs that are done still read (and ignore) up to 16 bytes past their end: pad with zeros.
    padded = np.zeros(len(buf) + 20, dtype=np.uint8)
    padded[:len(buf)] = buf
    # A little-endian uint32 starting at every byte, from an unaligned, overlapping view
    # (copied to a contiguous array once: gathers from it are ~3x faster).
    win = np.ascontiguousarray(np.ndarray((len(buf) + 17,), dtype="<u4", buffer=padded, strides=(1,)))
    pos = np.asarray(starts, dtype=np.int64).copy()
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(pos)
    h = np.full(n, _P5, dtype=np.uint32)
    stripes = lengths >> 4
    big = np.flatnonzero(stripes)
    if len(big):
        # The four lanes of a stripe in one gather: row o is the 16 bytes starting at byte o.
        win4 = np.lib.stride_tricks.as_strided(win, shape=(len(win) - 12, 4), strides=(4, 16))
        v = np.empty((len(big), 4), dtype=np.uint32)
        v[:] = [(0x9E3779B1 + 0x85EBCA77) & _M32, 0x85EBCA77, 0, -0x9E3779B1 & _M32]
        p, left = pos[big], stripes[big] - 1
        v = _rotl(v + win4[p] * _P2, 13) * _P1  # the first stripe: all of them
        p += 16
        act = np.flatnonzero(left)
        while len(act):  # the inputs with stripes left (usually few)
            x = win4[p[act]]
            v[act] = _rotl(v[act] + x * _P2, 13) * _P1
            p[act] += 16
            left[act] -= 1
            act = act[left[act] > 0]
        h[big] = _rotl(v[:, 0], 1) + _rotl(v[:, 1], 7) + _rotl(v[:, 2], 12) + _rotl(v[:, 3], 18)
        pos[big] = p
    h += lengths.astype(np.uint32)
    rem = lengths & 15
    words, tail = rem >> 2, rem & 3
    for k in range(int(words.max(initial=0))):  # up to three 4-byte words
        more = words > k
        h = np.where(more, _rotl(h + win[pos] * _P3, 17) * _P4, h)
        pos += 4 * more
    if tail.any():
        last = win[pos]  # the up to three single bytes left, read at once
        for k in range(int(tail.max())):
            byte = (last >> np.uint32(8 * k)) & np.uint32(0xFF)
            h = np.where(tail > k, _rotl(h + byte * _P5, 11) * _P1, h)
    h ^= h >> np.uint32(15)
    h *= _P2
    h ^= h >> np.uint32(13)
    h *= _P3
    h ^= h >> np.uint32(16)
    return h


# ASCII documents' shingles are found and hashed for a whole batch in numpy: lowercase, runs of
# [0-9A-Za-z_] (what \w+ matches in ASCII), joined by single spaces, n words per shingle.
_WORD_BYTES = bytes(int(chr(c).isalnum() or c == 95) for c in range(128)) + bytes(128)  # 1 for \w
# A \w byte lowercased, any other byte a space: what the joined shingle text holds at each byte kept.
_LOWER_OR_SPACE = bytes(ord(chr(c).lower()) if _WORD_BYTES[c] else 32 for c in range(256))


def ascii_shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """xxh32 of each ASCII text's ``shingles(text, n)``, concatenated, and how many per text."""
    sep = "\n".join(texts).encode("ascii")  # "\n" is not a word character: no word spans two texts
    raw = np.frombuffer(sep.translate(_LOWER_OR_SPACE), dtype=np.uint8)
    word = np.frombuffer(sep.translate(_WORD_BYTES), dtype=bool)
    after = np.zeros_like(word)
    after[1:] = word[:-1]  # the character follows a word character
    is_start = word & ~after
    # The words joined by single spaces: keep the word characters and the first character of each
    # gap after a word (a space in ``raw``); a gap before the first word is dropped.
    keep = word | after
    joined = raw[keep]
    jword = word[keep]
    prev = np.zeros(len(jword) + 1, dtype=bool)
    prev[1:] = jword
    nxt = np.zeros(len(jword) + 1, dtype=bool)
    nxt[:-1] = jword
    wstart = np.flatnonzero(nxt & ~prev)  # a word begins: this character is one, the last was not
    wend = np.flatnonzero(prev & ~nxt)    # one past a word's end
    wlen = wend - wstart
    jstart = wstart
    # Words per text: the word starts within each text's characters.
    offsets = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    # (text i's characters are offsets[i] up to offsets[i + 1], the last's up to the end)
    k = np.diff(np.searchsorted(np.flatnonzero(is_start), np.append(offsets, len(raw))))
    first = np.cumsum(k) - k
    last = first + k
    counts = np.maximum(k - n + 1, 1)
    # Shingle j of a text starts at its word first + j and ends with word min(first + j + n, last) - 1.
    doc = np.repeat(np.arange(len(texts)), counts)
    j = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    s_word = first[doc] + j
    e_word = np.minimum(s_word + n, last[doc]) - 1
    empty = k[doc] == 0
    s_word = np.where(empty, 0, s_word)
    e_word = np.where(empty, 0, e_word)
    if len(wlen):
        starts = jstart[s_word]
        lengths = np.where(empty, 0, jstart[e_word] + wlen[e_word] - starts)
    else:
        starts = lengths = np.zeros(len(doc), dtype=np.int64)
    return xxh32_many(joined, starts, lengths), counts


class MinHasher:
    """MinHash signatures with ``num_perm`` permutations (the permutations are made once)."""

    def __init__(self, num_perm: int, seed: int = 1, ngram: int = 5, scheme: str | None = None):
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram
        self.scheme = scheme or datasketch_scheme()
        self.a, self.b = permutations(num_perm, seed, self.scheme)

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """One uint32 signature row per text (every text has at least one shingle)."""
        asc = [t.isascii() for t in texts]
        hashes: list = [None] * len(texts)
        if all(asc) and texts:
            hv, counts = ascii_shingle_hashes(texts, self.ngram)
            return self._minimum(hv.astype(np.uint64), counts)
        if any(asc):
            hv, counts = ascii_shingle_hashes([t for t, a in zip(texts, asc) if a], self.ngram)
            parts = iter(np.split(hv, np.cumsum(counts)[:-1]))
            for i, a in enumerate(asc):
                if a:
                    hashes[i] = next(parts)
        for i, a in enumerate(asc):
            if not a:
                hashes[i] = np.fromiter(map(xxhash.xxh32_intdigest, shingles(texts[i], self.ngram)), dtype=np.uint32)
        counts = np.fromiter(map(len, hashes), dtype=np.int64, count=len(hashes))
        hv = np.concatenate(hashes).astype(np.uint64) if hashes else np.zeros(0, dtype=np.uint64)
        return self._minimum(hv, counts)

    def _minimum(self, hv: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Per text (``counts`` shingle hashes each, in ``hv``), the minimum of each permutation."""
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        out = np.empty((self.num_perm, len(counts)), dtype=np.uint32)  # transposed: rows written whole
        if not len(counts):
            return out.T
        # One permutation at a time over all shingles of the batch: the working set stays in
        # cache, which is ~10x faster than one (shingles x permutations) matrix.
        if self.scheme == "legacy":  # datasketch < 2.0: uint64, mod the Mersenne prime, low 32 bits
            tmp = np.empty(len(hv), dtype=np.uint64)
            for p in range(self.num_perm):
                np.multiply(hv, self.a[p], out=tmp)
                tmp += self.b[p]
                tmp %= np.uint64(_MERSENNE_PRIME)
                tmp &= np.uint64(_MAX_HASH)
                np.minimum.reduceat(tmp, starts, out=out[p])
        else:  # "affine32": murmur3's finalizer, then a * h + b in wrapping uint32
            hv = _fmix32(hv.astype(np.uint32))
            tmp = np.empty(len(hv), dtype=np.uint32)
            for p in range(self.num_perm):
                np.multiply(hv, self.a[p], out=tmp)
                tmp += self.b[p]
                np.minimum.reduceat(tmp, starts, out=out[p])
        return np.ascontiguousarray(out.T)


class NearDedup:
    """An LSH index with explicit (bands, rows): a signature is a duplicate when any of its bands
    equals that band of an indexed signature (what datasketch's ``MinHashLSH.query`` finds)."""

    def __init__(self, bands: int = 14, rows: int = 8, seed: int = 1):
        self.bands, self.rows, self.seed = bands, rows, seed
        self._tables: list[set[bytes]] = [set() for _ in range(bands)]
        w = 4 * rows
        self._cuts = [slice(i * w, (i + 1) * w) for i in range(bands)]

    def is_duplicate(self, signature: np.ndarray) -> bool:
        """True if ``signature`` collides with an indexed one; otherwise index it."""
        row = np.ascontiguousarray(signature, dtype="<u4").tobytes()
        keys = list(map(row.__getitem__, self._cuts))  # the band keys (the loops run in C)
        if any(map(set.__contains__, self._tables, keys)):
            return True
        for _ in map(set.add, self._tables, keys):
            pass
        return False
