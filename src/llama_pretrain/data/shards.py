"""On-disk format of a prepared dataset, and its reader.

A dataset directory holds::

    manifest.json            what is in it (see prepare.py): dtype, tokenizer, splits, accounting
    train/00000.bin ...      flat little-endian token ids (uint16, or uint32 when vocab > 65,536)
    train/00000.idx ...      document boundaries: little-endian uint64 offsets into the .bin file,
                             one per document start plus a final one equal to the shard length
    val/00000.bin, .idx      the validation split, same format

Each document is ``BOS text-tokens EOS``; documents never straddle shard files. Each shard's
manifest entry records its ``max_token_id``, so training can refuse ids outside the vocabulary
without reading the shards (older manifests lack it: the memory map is scanned instead). Shards are written
under a temporary name and renamed when complete, so a file under its final name is whole.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from contextlib import AbstractContextManager
from typing import IO, Any, Iterator

import numpy as np

from ..config import parse_json
from ..errors import UserError
from ..fsutil import atomic_file, sha256_file

MANIFEST = "manifest.json"
FORMAT = "llama-pretrain-tokens/1"
PIPELINE_VERSION = 1  # of data prepare: in each manifest and in each unit's fingerprint
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def np_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise UserError(f"unsupported token dtype {name!r} in manifest")
    return np.dtype("<u2" if name == "uint16" else "<u4")


def read_manifest(dir: str | Path) -> dict[str, Any]:
    """The dataset's manifest.json as a dict; ``UserError`` if absent or unreadable."""
    path = Path(dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{dir} is not a prepared dataset (no {MANIFEST}); "
                        f"create one with `llama-pretrain data prepare`")
    try:
        m = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest")
    check_manifest(m, path)
    return m


_MISSING = object()


def _require(path: Path, field: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        got = "missing" if value is _MISSING else f"{value!r}"[:80]
        raise UserError(f"{path}: malformed manifest: {field} is {got}, expected {expected}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_inner_path(value: Any) -> bool:
    """A relative path that stays inside the dataset dir (a hostile manifest cannot point elsewhere)."""
    return (isinstance(value, str) and bool(value) and not Path(value).is_absolute()
            and ".." not in Path(value).parts)


def check_manifest(m: dict, path: Path) -> None:
    """Every field the readers use has its type, so a malformed manifest is one line naming the
    field, never a traceback from deep inside a reader."""
    dtype = m.get("dtype", _MISSING)
    _require(path, "dtype", dtype, dtype in ("uint16", "uint32"), "'uint16' or 'uint32'")
    tok = m.get("tokenizer", {})
    _require(path, "tokenizer", tok, isinstance(tok, dict), "an object")
    for key, ok, expected in (("vocab_size", _is_count, "a non-negative integer"),
                              ("sha256", lambda v: isinstance(v, str), "a string")):
        if key in tok:
            _require(path, f"tokenizer.{key}", tok[key], ok(tok[key]), expected)
    splits = m.get("splits", _MISSING)
    _require(path, "splits", splits, isinstance(splits, dict), "an object of split name -> split")
    for name, split in splits.items():
        _check_split(path, f"splits.{name}", split)


def _check_split(path: Path, where: str, split: Any) -> None:
    _require(path, where, split, isinstance(split, dict), "an object with 'shards'")
    for key in ("tokens", "documents"):
        if key in split:
            _require(path, f"{where}.{key}", split[key], _is_count(split[key]), "a non-negative integer")
    shards = split.get("shards", _MISSING)
    _require(path, f"{where}.shards", shards, isinstance(shards, list), "a list")
    for i, sh in enumerate(shards):
        at = f"{where}.shards[{i}]"
        _require(path, at, sh, isinstance(sh, dict), "an object")
        for key in ("file", "index"):
            v = sh.get(key, _MISSING)
            _require(path, f"{at}.{key}", v, _is_inner_path(v), "a relative path inside the dataset")
        for key in ("tokens", "documents") + (("max_token_id",) if "max_token_id" in sh else ()):
            v = sh.get(key, _MISSING)
            _require(path, f"{at}.{key}", v, _is_count(v), "a non-negative integer")


def _split_info(manifest: dict, dir: Path, split: str) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{dir}: no split {split!r}; splits: {', '.join(splits) or 'none'}")
    return splits[split]


def open_tokens(dir: str | Path, split: str = "train") -> list[np.memmap]:
    """Read-only memory maps of the split's token files, one per shard, in stream order."""
    dir = Path(dir)
    m = read_manifest(dir)
    dtype = np_dtype(m["dtype"])
    out = []
    for sh in _split_info(m, dir, split)["shards"]:
        path = dir / sh["file"]
        expected = int(sh["tokens"]) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise UserError(f"{path}: missing or not {expected} bytes; the dataset is incomplete")
        out.append(np.memmap(path, dtype=dtype, mode="r", shape=(int(sh["tokens"]),)))
    return out


def open_doc_index(dir: str | Path, split: str = "train") -> list[np.ndarray]:
    """Per shard, the uint64 document offsets (documents + 1 entries)."""
    dir = Path(dir)
    m = read_manifest(dir)
    out: list[np.ndarray] = []
    for sh in _split_info(m, dir, split)["shards"]:
        path, n = dir / sh["index"], int(sh["documents"]) + 1
        if not path.is_file() or path.stat().st_size != 8 * n:
            raise UserError(f"{path}: missing or not {8 * n} bytes; the dataset is incomplete")
        out.append(np.memmap(path, dtype="<u8", mode="r", shape=(n,)))
    return out


def check_token_ids(dir: str | Path, split: str, vocab_size: int) -> None:
    """Refuse a split holding a token id >= ``vocab_size``: otherwise it fails only when a batch
    hits it (hours in, or as a device assert on GPU). Uses each shard's recorded ``max_token_id``,
    else scans the shard's memory map once."""
    dir = Path(dir)
    shards = _split_info(read_manifest(dir), dir, split)["shards"]
    for sh, toks in zip(shards, open_tokens(dir, split)):
        top = sh["max_token_id"] if "max_token_id" in sh else int(toks.max()) if len(toks) else 0
        if top >= vocab_size:
            raise UserError(f"{dir / sh['file']}: holds token id {top}, outside the vocabulary of "
                            f"{vocab_size}; the shards were not made with this tokenizer / model")


def iter_documents(dir: str | Path, split: str = "train") -> Iterator[np.ndarray]:
    """Each document's token ids (BOS ... EOS), in stream order."""
    for toks, idx in zip(open_tokens(dir, split), open_doc_index(dir, split)):
        for a, b in zip(idx[:-1], idx[1:]):
            yield np.asarray(toks[int(a):int(b)])


class ShardWriter:
    """Appends documents to ``<dir>/<split>/NNNNN.bin`` files of about ``shard_tokens`` tokens."""

    def __init__(self, dir: Path, split: str, dtype: str, shard_tokens: int, first_index: int = 0):
        self.dir, self.split, self.dtype = Path(dir), split, np_dtype(dtype)
        self.first_index = int(first_index)  # the number of its first shard file
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._cm: AbstractContextManager[IO[bytes]] | None = None  # set together with _fh
        self._fh: IO[bytes] | None = None
        self._offsets = array("Q")  # 8 bytes per document (a list of ints takes ~40)
        self._n = 0

    def _open(self) -> IO[bytes]:
        i = self.first_index + len(self.shards)
        self._name = f"{self.split}/{i:05d}"
        cm = atomic_file(self.dir / f"{self._name}.bin", "wb")
        fh = self._fh = cm.__enter__()
        self._cm = cm
        self._offsets, self._n, self._max = array("Q"), 0, 0
        return fh

    def _shard_file(self, n: int) -> IO[bytes]:
        """The file of the shard that takes the next ``n`` tokens: a new shard when they would
        overflow a non-empty one."""
        if self._cm is not None and self._n and self._n + n > self.shard_tokens:
            self._close()
        return self._open() if self._fh is None else self._fh

    def _close(self) -> None:
        if self._cm is None:
            return
        self._offsets.append(self._n)
        self._cm.__exit__(None, None, None)
        with atomic_file(self.dir / f"{self._name}.idx", "wb") as fh:
            fh.write(np.frombuffer(self._offsets, dtype=np.uint64).astype("<u8").tobytes())
        self.shards.append({"file": f"{self._name}.bin", "index": f"{self._name}.idx",
                            "tokens": self._n, "documents": len(self._offsets) - 1, "max_token_id": self._max})
        self._cm = self._fh = None

    def add(self, tokens: np.ndarray) -> None:
        fh = self._shard_file(len(tokens))
        tokens = np.asarray(tokens)
        if len(tokens):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi > np.iinfo(self.dtype).max:
                # astype would wrap silently: a wrong dtype for the vocabulary is a bug upstream
                raise ValueError(f"token ids {lo}..{hi} do not fit {self.dtype.name} shards")
            self._max = max(self._max, hi)
        self._offsets.append(self._n)
        fh.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._n += len(tokens)

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back in ``tokens``, ``lengths`` tokens each: the same files as ``add``
        for each in turn, written a shard's share at a time."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        i = 0
        while i < len(lengths):
            fh = self._shard_file(int(lengths[i]))
            # documents i..j-1 fit in this shard (document i does in any case, as with add)
            j = max(i + 1, int(np.searchsorted(ends, self.shard_tokens - self._n + starts[i], side="right")))
            piece = tokens[starts[i]:ends[j - 1]]
            if len(piece):
                lo, hi = int(piece.min()), int(piece.max())
                if lo < 0 or hi > np.iinfo(self.dtype).max:
                    raise ValueError(f"token ids {lo}..{hi} do not fit {self.dtype.name} shards")
                self._max = max(self._max, hi)
            self._offsets.frombytes((self._n + starts[i:j] - starts[i]).astype(np.uint64).tobytes())
            fh.write(piece.astype(self.dtype, copy=False).tobytes())
            self._n += len(piece)
            i = j

    def close(self) -> list[dict]:
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._cm is not None:
            try:
                self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._cm = self._fh = None


def dataset_tokenizer(data_dir: str | Path, explicit: str | Path | None = None) -> Path | None:
    """The tokenizer.model a dataset was made with: ``explicit`` when given (it must exist, and be
    the one the manifest's sha256 names), else one in the dataset dir, else the one its manifest
    records (as recorded, relative to the dataset, or by name beside it), skipping files whose
    sha256 is not the manifest's; None when it cannot be found."""
    data = Path(data_dir)
    try:
        recorded = read_manifest(data).get("tokenizer", {})
    except UserError:
        recorded = {}
    want = recorded.get("sha256")
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"data.tokenizer {p} does not exist")
        got = sha256_file(p)
        if want and got != want:  # same vocabulary size or not: these ids mean other pieces
            raise UserError(f"data.tokenizer {p} is not the tokenizer {data} was made with "
                            f"(sha256 {got[:16]}..., the manifest records {want[:16]}...)")
        return p
    for p in _tokenizer_candidates(data, recorded.get("path")):
        if p.is_file() and (not want or sha256_file(p) == want):
            return p
    return None


def datasets_tokenizer(data_dirs: list[str] | list[Path], explicit: str | Path | None = None) -> Path | None:
    """``dataset_tokenizer`` over several dataset dirs: each is checked against ``explicit``, and
    the first dir whose tokenizer is found gives it."""
    found = [dataset_tokenizer(d, explicit) for d in data_dirs]
    return next((p for p in found if p is not None), None)


def _tokenizer_candidates(data: Path, recorded: Any) -> list[Path]:
    out = [data / "tokenizer.model"]
    if isinstance(recorded, str) and recorded:
        name = Path(recorded).name
        out += [Path(recorded), data / recorded, data / name, data.parent / name]
    return out
