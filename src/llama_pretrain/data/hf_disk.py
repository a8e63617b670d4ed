"""Hugging Face ``datasets`` trees written by ``save_to_disk``, read with pyarrow only.

A saved split is a directory with ``state.json`` (which lists its files), ``dataset_info.json``
and ``data-0000i-of-0000N.arrow`` files in Arrow's IPC *stream* format; a ``DatasetDict`` adds
``dataset_dict.json`` and one such directory per split. The data pipeline (``sources``) and the
benchmark loader (``eval.tasks.data``) both read them through this module.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Iterator

from ..config import parse_json

STATE = "state.json"


class CompressedStream(ValueError):
    """An Arrow stream whose record batches have compressed buffers."""


def is_saved_split(d: Path) -> bool:
    """Whether ``d`` is a split directory written by ``save_to_disk`` (it holds ``state.json``)."""
    return (d / STATE).is_file()


def arrow_files(split_dir: Path) -> list[Path]:
    """The Arrow files of a save_to_disk split, in state.json's order (else by name)."""
    if not split_dir.is_dir():
        return []
    try:
        with open(split_dir / STATE, encoding="utf-8") as fh:
            state = parse_json(fh.read(1 << 20))  # a real one is a few hundred bytes
        names = [d["filename"] for d in state["_data_files"]]
        files = [split_dir / n for n in names if isinstance(n, str) and "/" not in n and n.endswith(".arrow")]
        if files and all(f.is_file() for f in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(split_dir.glob("*.arrow"))


@contextlib.contextmanager
def open_stream(path: Path) -> Iterator:
    """A ``pyarrow.ipc.RecordBatchStreamReader`` over the memory-mapped file: a batch is not copied
    until its rows are read, so they can be measured first. ``CompressedStream`` for a stream with
    compressed buffers, which would be decompressed whole before its rows could be measured
    (save_to_disk writes them uncompressed); pyarrow's own errors for a file that is no stream."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        if any(ipc_compressed(m.metadata.to_pybytes()) for m in pa.ipc.MessageReader.open_stream(src)):
            raise CompressedStream(f"{path}: Arrow stream with compressed buffers; save_to_disk writes them "
                                   f"uncompressed (a compressed one could hide any size)")
        src.seek(0)
        yield pa.ipc.open_stream(src)


def ipc_compressed(md: bytes) -> bool:
    """Whether an Arrow IPC message (its flatbuffer metadata) is a record or dictionary batch with
    compressed buffers: ``Message.header`` -> ``RecordBatch.compression`` is set."""

    def table(pos: int):
        vtable = pos - struct.unpack_from("<i", md, pos)[0]
        size = struct.unpack_from("<H", md, vtable)[0]
        return lambda i: struct.unpack_from("<H", md, vtable + 4 + 2 * i)[0] if 4 + 2 * i < size else 0

    def child(pos: int, off: int) -> int:
        return pos + off + struct.unpack_from("<I", md, pos + off)[0]

    root = struct.unpack_from("<I", md, 0)[0]
    message = table(root)
    kind = md[root + message(1)] if message(1) else 0
    if kind not in (2, 3) or not message(2):  # 2: DictionaryBatch, 3: RecordBatch
        return False
    header = child(root, message(2))
    batch = table(header)
    if kind == 2:  # a DictionaryBatch holds its RecordBatch in field 1
        if not batch(1):
            return False
        batch = table(child(header, batch(1)))
    return bool(batch(3))
