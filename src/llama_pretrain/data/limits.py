"""How much one input record, line and file may hold, so that a small hostile input (a gzip or
Parquet bomb, a file of one endless line, ``/dev/zero``) costs bounded memory and time.

``data prepare``'s readers (``sources``) drop a record over the limit and count it (``too_long``);
``eval``'s reader (``eval.tasks.data``) refuses it, since a benchmark must not lose records.
A line is read with ``readline(limit)`` and the rest of an overlong one skipped a chunk at a
time; a text file is read up to the limit.

Parquet: pyarrow decodes a page at a time, so the checks use the sizes the file declares: a row
group's uncompressed bytes and value count (its metadata) and each dictionary page's size (its
page header, which pyarrow holds the page to). A row group whose rows average more than the
limit is not read (its pages are that big); another is read in batches of about
``PARQUET_BATCH_BYTES``, each row counted as big as the largest dictionary page it may repeat,
and a row's length is known (``binary_length``) before it becomes a Python string. What is left:
a page holding one huge value among small ones costs its size once.
"""

from __future__ import annotations

from typing import IO, AnyStr, Iterator, Protocol, TypeVar

import numpy as np

MAX_RECORD_BYTES = 16 << 20
"""The most one record may hold: a JSONL line (newline excluded), a plain-text file, or a Parquet
row's text and URL together (for ``eval``: a record's fields, at about 64 bytes per value)."""

MAX_SPLIT_BYTES = 1 << 30
"""The most one ``eval`` split file may hold once decompressed (it is held whole, as records)."""

PARQUET_BATCH_BYTES = 64 << 20
"""About how much one Parquet batch holds (at most ``PARQUET_BATCH_ROWS`` rows)."""

PARQUET_BATCH_ROWS = 1024

_SKIP_CHUNK = 1 << 20  # the rest of an overlong line is read and dropped this much at a time
_VALUE_COST = 64  # bytes a Python object costs beyond its payload, roughly (eval's accounting)

_Line = TypeVar("_Line", covariant=True)


class LineReader(Protocol[_Line]):
    """A binary or text file (or ``gzip.open``'s): all ``bounded_lines`` needs."""

    def readline(self, size: int, /) -> _Line: ...


def bounded_lines(fh: LineReader[AnyStr], limit: int) -> Iterator[AnyStr | None]:
    """The lines of ``fh`` (binary or text), each at most ``limit`` bytes or characters plus its
    newline; ``None`` in place of a longer line, which is skipped without being held whole."""
    readline = fh.readline
    while True:
        line = readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line[-1:] in ("\n", b"\n"):
            yield line
            continue
        while True:  # skip to the end of this line
            rest = readline(_SKIP_CHUNK)
            if not rest or rest[-1:] in ("\n", b"\n"):
                break
        yield None


# ---------------------------------------------------------------------------------------------
# Parquet


def declared_bytes(row_group, schema, columns: list[str] | None) -> int:
    """What a row group's metadata declares the top-level ``columns`` (None: all) hold once
    decoded: their uncompressed bytes plus ``_VALUE_COST`` per value (a list of a million nulls
    is a few bytes in the file, and a million Python objects once read)."""
    total = 0
    for j in range(row_group.num_columns):
        if _of(schema.column(j).path, columns):
            col = row_group.column(j)
            total += max(int(col.total_uncompressed_size), 0) + _VALUE_COST * max(int(col.num_values), 0)
    return total


def _of(path: str, columns: list[str] | None) -> bool:
    """Whether a leaf column (``a.b.c``) belongs to one of the top-level ``columns``."""
    return columns is None or any(path == c or path.startswith(c + ".") for c in columns)


def mean_row_over_limit(rows: int, nbytes: int) -> bool:
    """A row group whose rows average more than the record limit: pyarrow would decode pages
    that big to find out which rows are."""
    return nbytes > max(rows, 1) * MAX_RECORD_BYTES


def rows_per_batch(rows: int, nbytes: int, dictionary: int | None) -> int:
    """Rows per batch for a row group of ``rows`` rows declaring ``nbytes`` bytes, whose largest
    dictionary page (``dictionary_bytes``) any row may repeat."""
    per_row = max(nbytes // max(rows, 1), nbytes if dictionary is None else dictionary, 1)
    return int(min(max(PARQUET_BATCH_BYTES // per_row, 1), PARQUET_BATCH_ROWS))


def dictionary_bytes(fh: IO[bytes], row_group, schema, columns: list[str]) -> int | None:
    """The largest dictionary page among a row group's ``columns``; None when a page header
    cannot be read."""
    largest = 0
    for j in range(row_group.num_columns):
        if _of(schema.column(j).path, columns):
            size = dictionary_page_bytes(fh, row_group.column(j))
            if size is None:
                return None
            largest = max(largest, size)
    return largest


def slices(sizes: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` ranges of rows of about ``budget`` bytes each (at least one row)."""
    ends = np.cumsum(sizes)
    start = 0
    while start < len(sizes):
        before = int(ends[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(ends, before + budget, side="right")))
        yield start, end
        start = end


def pylist(arr, start: int, end: int, skip: np.ndarray) -> list:
    """Rows ``start:end`` of ``arr`` as Python values, None for those marked in ``skip`` (never
    decoded)."""
    import pyarrow as pa

    part, skipped = arr.slice(start, end - start), skip[start:end]
    if not skipped.any():
        return part.to_pylist()
    kept = iter(part.filter(pa.array(~skipped)).to_pylist())
    return [None if s else next(kept) for s in skipped]


def string_lengths(arr) -> np.ndarray | None:
    """Bytes of each value of a column of strings (0 for null), a dictionary's rows measured
    without decoding them; None when ``arr`` does not hold strings."""
    return _byte_lengths(arr) if is_string_type(arr.type) else None


def _byte_lengths(arr) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        lengths = pc.binary_length(_plain(arr.dictionary)).take(arr.indices)
    else:
        lengths = pc.binary_length(_plain(arr))
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _is_bytes(t) -> bool:
    import pyarrow as pa

    return is_string_type(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_view(t)


def is_string_type(t) -> bool:
    """Strings, plain or dictionary-encoded."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_view(t, "string")


def _is_view(t, kind: str = "") -> bool:
    import pyarrow as pa

    tests = [getattr(pa.types, f"is_{k}_view", None) for k in ([kind] if kind else ["string", "binary"])]
    return any(test is not None and test(t) for test in tests)  # pyarrow >= 16


def _plain(arr):
    """``arr`` in a type ``binary_length`` takes (views are copied, a batch at a time)."""
    import pyarrow as pa

    if _is_view(arr.type):
        return arr.cast(pa.large_string() if is_string_type(arr.type) else pa.large_binary())
    return arr


def value_costs(arr) -> np.ndarray:
    """About how many bytes each value of ``arr`` takes as Python objects: its strings' bytes
    (a dictionary's counted at every use) plus ``_VALUE_COST`` per value, nested ones included."""
    import pyarrow as pa

    t, n = arr.type, len(arr)
    cost = np.full(n, _VALUE_COST, dtype=np.int64)
    if _is_bytes(t.value_type if pa.types.is_dictionary(t) else t):
        return cost + _byte_lengths(arr)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        inner = np.concatenate([[0], np.cumsum(value_costs(arr.values))])
        return cost + inner[offsets[1:]] - inner[offsets[:-1]]
    if pa.types.is_fixed_size_list(t):
        return cost + value_costs(arr.flatten()).reshape(n, t.list_size).sum(axis=1)
    if pa.types.is_struct(t):
        for child in arr.flatten():
            cost += value_costs(child)
        return cost
    if pa.types.is_dictionary(t):  # of numbers: fixed-size values
        return cost + arr.dictionary.nbytes // max(len(arr.dictionary), 1)
    try:
        return cost + t.bit_width // 8
    except ValueError:  # not fixed-width (a union, ...): its share of the column's bytes
        return cost + arr.nbytes // max(n, 1)


# -- Parquet page headers (Thrift compact protocol), for the one size the metadata leaves out:
# a dictionary page's. A row of a dictionary-encoded column may be any entry of its dictionary,
# so a batch of R rows can decode to R times the largest entry, from a few bytes of indices.

_DICTIONARY_PAGE = 2
_MAX_PAGES = 100_000  # a longer walk gives up (the caller then assumes the worst)
_MAX_HEADER = 1 << 20  # far above a real one (pyarrow allows 16 MiB; a longer one gives up)


def dictionary_page_bytes(fh: IO[bytes], column) -> int | None:
    """The decoded size of the largest dictionary page of a column chunk (0 without one), from
    its page headers (pyarrow checks a page against its header when decompressing); None when
    the headers cannot be read."""
    start = column.data_page_offset
    if column.has_dictionary_page and 0 < (column.dictionary_page_offset or 0) < start:
        start = column.dictionary_page_offset
    end, pos, largest = start + column.total_compressed_size, start, 0
    try:
        for _ in range(_MAX_PAGES):
            if pos >= end:
                return largest
            header, length = _page_header(fh, pos)
            if header.get(1) == _DICTIONARY_PAGE:
                largest = max(largest, header[2])
            if header[3] < 0:
                return None
            pos += length + header[3]
    except (ValueError, IndexError, KeyError, OSError):
        pass
    return None


def _page_header(fh: IO[bytes], pos: int) -> tuple[dict[int, int], int]:
    """A PageHeader's fields 1-3 (type, uncompressed size, compressed size) and its length."""
    size = 256
    while True:
        fh.seek(pos)
        buf = fh.read(size)
        try:
            return _struct(buf, 0, 0)
        except IndexError:
            if len(buf) < size or size >= _MAX_HEADER:
                raise
            size *= 16


def _struct(buf: bytes, pos: int, depth: int) -> tuple[dict[int, int], int]:
    """A compact-protocol struct at ``pos``: its i32 fields 1-3 (at the top level) and its end."""
    if depth > 32:
        raise ValueError("nested too deeply")
    fields: dict[int, int] = {}
    fid = 0
    while True:
        b = buf[pos]
        pos += 1
        if b == 0:  # stop
            return fields, pos
        ftype, delta = b & 0x0F, b >> 4
        if delta:
            fid += delta
        else:
            fid, pos = _varint(buf, pos)
            fid = _unzigzag(fid)
        if ftype == 5 and depth == 0 and fid in (1, 2, 3):
            v, pos = _varint(buf, pos)
            fields[fid] = _unzigzag(v)
        else:
            pos = _skip(buf, pos, ftype, depth)


def _skip(buf: bytes, pos: int, ftype: int, depth: int, in_list: bool = False) -> int:
    if ftype in (1, 2):  # a bool: in the field's type, or a byte of its own in a list
        return pos + 1 if in_list else pos
    if ftype == 3:
        return pos + 1
    if ftype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ftype == 7:
        return pos + 8
    if ftype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ftype in (9, 10):  # list, set
        b = buf[pos]
        n, etype, pos = b >> 4, b & 0x0F, pos + 1
        if n == 15:
            n, pos = _varint(buf, pos)
        for _ in range(n):
            pos = _skip(buf, pos, etype, depth + 1, True)
        return pos
    if ftype == 11:  # map
        n, pos = _varint(buf, pos)
        if n:
            kv, pos = buf[pos], pos + 1
            for _ in range(n):
                pos = _skip(buf, _skip(buf, pos, kv >> 4, depth + 1, True), kv & 0x0F, depth + 1, True)
        return pos
    if ftype == 12:
        return _struct(buf, pos, depth + 1)[1]
    raise ValueError(f"unknown Thrift type {ftype}")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint too long")


def _unzigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)
