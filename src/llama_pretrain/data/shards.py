"""On-disk format of a prepared dataset, and its reader.

A dataset directory holds::

    manifest.json            what is in it (see prepare.py): dtype, tokenizer, splits, accounting
    train/00000.bin ...      flat little-endian token ids (uint16, or uint32 when vocab > 65,536)
    train/00000.idx ...      document boundaries: little-endian uint64 offsets into the .bin file,
                             one per document start plus a final one equal to the shard length
    val/00000.bin, .idx      the validation split, same format

Each document is ``BOS text-tokens EOS``; documents never straddle shard files. Shards are written
under a temporary name and renamed when complete, so a file under its final name is whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_file

MANIFEST = "manifest.json"
FORMAT = "llama-pretrain-tokens/1"
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
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest")
    return m


def _split_info(manifest: dict, dir: Path, split: str) -> dict:
    splits = manifest.get("splits", {})
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
    out = []
    for sh in _split_info(m, dir, split)["shards"]:
        out.append(np.memmap(dir / sh["index"], dtype="<u8", mode="r", shape=(int(sh["documents"]) + 1,)))
    return out


def iter_documents(dir: str | Path, split: str = "train") -> Iterator[np.ndarray]:
    """Each document's token ids (BOS ... EOS), in stream order."""
    for toks, idx in zip(open_tokens(dir, split), open_doc_index(dir, split)):
        for a, b in zip(idx[:-1], idx[1:]):
            yield np.asarray(toks[int(a):int(b)])


class ShardWriter:
    """Appends documents to ``<dir>/<split>/NNNNN.bin`` files of about ``shard_tokens`` tokens."""

    def __init__(self, dir: Path, split: str, dtype: str, shard_tokens: int):
        self.dir, self.split, self.dtype = Path(dir), split, np_dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._cm = None
        self._fh = None
        self._offsets: list[int] = []
        self._n = 0

    def _open(self) -> None:
        i = len(self.shards)
        self._name = f"{self.split}/{i:05d}"
        self._cm = atomic_file(self.dir / f"{self._name}.bin", "wb")
        self._fh = self._cm.__enter__()
        self._offsets, self._n = [], 0

    def _close(self) -> None:
        if self._cm is None:
            return
        self._offsets.append(self._n)
        self._cm.__exit__(None, None, None)
        with atomic_file(self.dir / f"{self._name}.idx", "wb") as fh:
            fh.write(np.asarray(self._offsets, dtype="<u8").tobytes())
        self.shards.append({"file": f"{self._name}.bin", "index": f"{self._name}.idx",
                            "tokens": self._n, "documents": len(self._offsets) - 1})
        self._cm = self._fh = None

    def add(self, tokens: np.ndarray) -> None:
        if self._cm is not None and self._n and self._n + len(tokens) > self.shard_tokens:
            self._close()
        if self._cm is None:
            self._open()
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            # astype would wrap silently: a wrong dtype for the vocabulary is a bug upstream
            raise ValueError(f"token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype.name} shards")
        self._offsets.append(self._n)
        self._fh.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._n += len(tokens)

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
    """The tokenizer.model a dataset was made with: ``explicit`` when given (it must exist), else
    one in the dataset dir, else the one its manifest records (as recorded, relative to the
    dataset, or by name beside it); None when it cannot be found."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"data.tokenizer {p} does not exist")
        return p
    data = Path(data_dir)
    if (data / "tokenizer.model").is_file():
        return data / "tokenizer.model"
    try:
        recorded = read_manifest(data).get("tokenizer")
    except UserError:
        return None
    recorded = recorded.get("path") if isinstance(recorded, dict) else None
    if isinstance(recorded, str) and recorded:
        name = Path(recorded).name
        for p in (Path(recorded), data / recorded, data / name, data.parent / name):
            if p.is_file():
                return p
    return None
