"""``TokenLoader``: endless, shuffled, rank-aware batches of packed token windows.

The split's shard files are memory-mapped and read as one concatenated token stream (documents
are already packed there, each ``BOS ... EOS``). Window ``k`` is ``stream[k*T : k*T + T + 1]``
(``T = seq_len``): consecutive windows share one token, so every token after the first is a
prediction target exactly once per epoch. There are ``(num_tokens - 1) // T`` windows.

Order. The loader walks a global sequence of window *positions* ``p = 0, 1, 2, ...``; position
``p`` is in epoch ``e = p // num_windows`` and maps to window ``perm_e(p % num_windows)``, where
``perm_e`` is a pseudo-random permutation keyed by ``(seed, e)``: a Feistel network with cycle
walking, so it needs O(1) memory however many windows there are. Epochs follow each other without
a gap (a batch may straddle two), so nothing is dropped and tiny corpora work.

Ranks. A global batch is ``batch_size * world_size`` consecutive positions. Rank ``r`` takes the
positions ``r, r + w, r + 2w, ...`` of each global batch. Hence ranks of one world are disjoint,
and a single process with ``batch_size = B * w`` sees exactly their union::

    single = torch.stack(rank_batches, dim=1).reshape(B * w, T + 1)   # rank_batches[r]: (B, T+1)

i.e. row ``j * w + r`` of the one-process batch is row ``j`` of rank ``r``. The state is the
global position only, so ``state_dict()`` is identical on every rank and a resumed run continues
with exactly the next batch.

Several directories. ``path`` may be a list of prepared dataset directories (the shards of several
``data prepare`` runs or tasks): their split's shards form one stream in the order given, exactly as
if one directory held them all, so everything above holds unchanged. They must share the token
dtype and the tokenizer. The state of a loader over several directories also records each one's
shard sizes, so a run does not resume on another list (a single directory's state is as before).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from ..errors import UserError
from .shards import open_tokens, read_manifest

DataDirs = str | Path | Sequence[str | Path]

STATE_VERSION = 1


class FeistelPermutation:
    """A keyed bijection of ``range(n)`` (4-round Feistel over the next even bit width, with
    cycle walking to stay inside ``n``)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [xxhash.xxh64_intdigest(f"{key}:{i}".encode()) for i in range(self.ROUNDS)]

    def _round(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            f = xxhash.xxh64_intdigest(right.to_bytes(8, "little"), seed=k) & self.mask
            left, right = right, left ^ f
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._round(i)
        while x >= self.n:  # cycle walking: expected < 4 steps since 2**bits < 4n
            x = self._round(x)
        return x


def data_dirs(path: DataDirs) -> list[Path]:
    """``path`` as a list of directories: one directory, or a list of them."""
    dirs = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not dirs:
        raise UserError("no data directory given")
    return dirs


def shared_manifest(dirs: list[Path]) -> dict[str, Any]:
    """The first directory's manifest, after checking every other one has its dtype and tokenizer
    (otherwise the same ids would be other pieces, or the bytes other ids)."""
    first = read_manifest(dirs[0])
    tok = first.get("tokenizer", {})
    for d in dirs[1:]:
        m = read_manifest(d)
        other = m.get("tokenizer", {})
        if m["dtype"] != first["dtype"]:
            raise UserError(f"{d}: token dtype {m['dtype']} differs from {first['dtype']} in {dirs[0]}; "
                            f"the data dirs of one run must be prepared with the same tokenizer")
        for key in ("sha256", "vocab_size"):
            if other.get(key) != tok.get(key):
                raise UserError(f"{d}: tokenizer {key} {str(other.get(key))[:16]!r} differs from "
                                f"{str(tok.get(key))[:16]!r} in {dirs[0]}; the data dirs of one run must "
                                f"be prepared with the same tokenizer")
    return first


class TokenLoader:
    """Batches of shape ``(batch_size, seq_len + 1)`` (int64) from a prepared dataset directory, or
    from a list of them read as one stream."""

    def __init__(self, path: DataDirs, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be >= 1 (got {batch_size}, {seq_len})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in a world of size {world_size}")
        self.dirs = data_dirs(path)
        self.path = self.dirs[0]
        manifest = shared_manifest(self.dirs)
        self.split = split
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle = shuffle
        tok = manifest.get("tokenizer", {})
        self.vocab_size: int = int(tok.get("vocab_size", 0))
        self.tokenizer_sha256: str = str(tok.get("sha256", ""))
        per_dir = [open_tokens(d, split) for d in self.dirs]
        self._shards = [s for shards in per_dir for s in shards]
        self._dir_shard_tokens = [[len(s) for s in shards] for shards in per_dir]
        lengths = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens: int = int(self._starts[-1])
        self.num_windows: int = (self.num_tokens - 1) // self.seq_len if self.num_tokens else 0
        if self.num_windows < 1:
            raise UserError(f"{self._shown()} split {split!r} has {self.num_tokens} tokens, fewer than "
                            f"seq_len + 1 = {self.seq_len + 1}; use a shorter seq_len or more data")
        self.position = 0  # global window position (the same on every rank)
        self._perms: dict[int, FeistelPermutation] = {}

    # -- order ----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.num_windows

    def _perm(self, epoch: int) -> FeistelPermutation:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 2:
                self._perms.clear()
            p = self._perms[epoch] = FeistelPermutation(self.num_windows, self.seed * 1_000_003 + epoch)
        return p

    def window_index(self, position: int) -> int:
        e, i = divmod(position, self.num_windows)
        return self._perm(e)(i) if self.shuffle else i

    def window(self, k: int) -> np.ndarray:
        """Tokens of window ``k`` (``seq_len + 1`` of them), possibly spanning two shards."""
        start = k * self.seq_len
        end = start + self.seq_len + 1
        s = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < end:
            off = start - int(self._starts[s])
            take = min(end - start, len(self._shards[s]) - off)
            parts.append(self._shards[s][off:off + take])
            start += take
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self):
        import torch

        gb = self.batch_size * self.world_size
        base = self.position
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for j in range(self.batch_size):
            out[j] = self.window(self.window_index(base + self.rank + j * self.world_size))
        # Preflight checked the manifest's max_token_id, not the bytes: a shard changed since would
        # fail in the embedding (an IndexError, on a GPU a device-side assert). One max per batch.
        if self.vocab_size and int(out.max()) >= self.vocab_size:
            raise self._outside_vocab(out, base)
        self.position = base + gb
        return torch.from_numpy(out)

    def _outside_vocab(self, out: np.ndarray, base: int) -> UserError:
        """The first id of the batch outside the vocabulary, by shard file and offset."""
        j, i = (int(x) for x in np.argwhere(out >= self.vocab_size)[0])
        pos = self.window_index(base + self.rank + j * self.world_size) * self.seq_len + i
        s = int(np.searchsorted(self._starts, pos, side="right")) - 1
        off, shard = pos - int(self._starts[s]), self._shards[s]
        return UserError(f"{shard.filename}: token id {out[j, i]} at offset {off} (byte {off * shard.dtype.itemsize}) "
                         f"is outside the vocabulary of {self.vocab_size}; the shard changed after it was "
                         f"prepared: prepare the dataset again")

    # -- resume ----------------------------------------------------------------------------------

    def _dirs_state(self) -> list[dict] | None:
        """Per directory its token count, shard count and a digest of its shard sizes; None for a
        single directory (whose state stays as it always was)."""
        if len(self.dirs) == 1:
            return None
        return [{"tokens": sum(sizes), "shards": len(sizes),
                 "digest": xxhash.xxh64(np.asarray(sizes, dtype="<i8").tobytes()).hexdigest()}
                for sizes in self._dir_shard_tokens]

    def state_dict(self) -> dict:
        d = {"version": STATE_VERSION, "position": int(self.position), "seed": self.seed,
             "seq_len": self.seq_len, "split": self.split, "num_windows": self.num_windows,
             "tokenizer_sha256": self.tokenizer_sha256}
        dirs = self._dirs_state()
        if dirs is not None:
            d["dirs"] = dirs
        return d

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict) or d.get("version") != STATE_VERSION:
            raise UserError("loader state is missing or from an incompatible version")
        if d.get("dirs") != self._dirs_state():
            raise UserError(f"loader state is from another list of data dirs ({_dirs_text(d.get('dirs'))}), "
                            f"now {_dirs_text(self._dirs_state())}; resume with the same dirs in the same order")
        for key in ("seq_len", "num_windows", "tokenizer_sha256", "split"):
            if d.get(key) != getattr(self, key):
                raise UserError(f"loader state does not match this dataset: {key} was {d.get(key)!r}, "
                                f"now {getattr(self, key)!r}")
        self.seed = int(d["seed"])
        self._perms.clear()
        self.position = int(d["position"])

    def _shown(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    def __repr__(self) -> str:
        return (f"TokenLoader({self._shown()!r}, split={self.split!r}, tokens={self.num_tokens}, "
                f"windows={self.num_windows}, batch={self.batch_size}x{self.seq_len + 1}, "
                f"rank={self.rank}/{self.world_size}, epoch={self.epoch})")


def _dirs_text(dirs: Any) -> str:
    """A loader state's directories in words: "one dir" or "2 dirs of 1200, 800 tokens"."""
    if not isinstance(dirs, list):
        return "one dir"
    tokens = ", ".join(str(d.get("tokens")) if isinstance(d, dict) else "?" for d in dirs)
    return f"{len(dirs)} dirs of {tokens} tokens"
