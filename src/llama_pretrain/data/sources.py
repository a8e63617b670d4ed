"""Input side of the data pipeline: finding files, the TOML data config, reading documents.

Supported inputs (by file name):

* ``*.jsonl`` / ``*.jsonl.gz`` / ``*.json.gz``: one JSON object per line, text in ``text_field``;
* ``*.parquet``: one row per document, text in the column ``text_field`` (a sharded dataset, a
  directory of them, nested or not, is one unit per file);
* a Hugging Face ``datasets`` directory written by ``save_to_disk``: one row per document, as for
  Parquet, from its ``data-*-of-*.arrow`` stream files (in ``state.json``'s order), read with
  pyarrow. A ``DatasetDict`` directory gives every split, in sorted order; name one split's
  directory (``DIR/train``) to read only it. A walk reads ``*.arrow`` only inside such a split
  directory (one with ``state.json``), never a stray Arrow file;
* ``*.txt`` / ``*.text`` / ``*.md`` / ``*.rst``, and any file named on its own or by a glob: a
  plain-text file is one document.

A directory is walked recursively for the formats above only: its other files (a TOML config, a
script, a binary) are not documents; name them, or glob them (``DIR/**/*.py``), to read them as text.

A big uncompressed JSONL or Parquet file may be read as several units (``file_spans``): a JSONL
file by byte range (a line belongs to the range holding its first byte), a Parquet file by
contiguous row groups. The records, their locations and the accounting are those of the whole file,
but for two checks made per part: the text field looked for in a JSONL part's objects, and reading
stopped at a damaged Parquet row group until the part's end rather than the file's.

Bad records never raise: ``iter_records`` yields them with a drop reason and a ``file:line``
location so the pipeline can count them (``--strict`` turns the first one into a ``UserError``).
A record over ``limits.MAX_RECORD_BYTES`` is one of them (``too_long``), found without being read
whole. Only regular files are read: a FIFO, device or socket found by a walk or a glob is refused
like a named one, and ``**`` enters each directory once, however many links lead back to it.
The one exception is a file in which *no* record has the configured text field: that is a
configuration mistake, reported as a ``UserError`` naming the file and the fields it does have.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import stat
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config_fields import at_least, between, check, coerce, setting, update
from ..errors import UserError
from . import drops, hf_disk, limits

# ---------------------------------------------------------------------------------------------
# Files


def expand_paths(patterns: list[str] | str) -> list[Path]:
    """Files named by ``patterns``: files, directories (recursive, for the known formats only,
    hidden entries skipped) and globs (``**`` allowed). Order is deterministic (sorted per
    pattern, first occurrence wins). Raises ``UserError`` naming the first pattern that matches no
    file, or that is not a regular file or directory."""
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    if not patterns:
        raise UserError("no input paths given")
    seen: dict[Path, None] = {}
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        p = Path(pat)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = _walk(p)
        elif glob.has_magic(pat):
            found = []
            for m in _glob(pat):
                mp = Path(m)
                found.extend(_walk(mp) if mp.is_dir() else [mp] if mp.exists() else [])
        elif p.exists():
            raise UserError(f"input path {pat} is not a regular file or a directory (a device, FIFO or socket)")
        else:
            raise UserError(f"input path {pat} does not exist")
        if not found and p.is_dir():
            raise UserError(f"input directory {pat} has no {', '.join(KNOWN_SUFFIXES)} files nor a "
                            f"save_to_disk dataset (other files "
                            f"are not read from a directory: name them or use a glob such as {pat}/**/*.py)")
        if not found:
            raise UserError(f"input {pat} matches no files")
        for f in found:
            _check_regular(f, pat)
            seen.setdefault(f, None)
    return list(seen)


def _check_regular(f: Path, pat: str) -> None:
    """Refuse what a walk or a glob found that is not a regular file: a FIFO blocks its reader
    and a device (a ``*.txt`` link to ``/dev/zero``) never ends. Checked without opening it."""
    try:
        mode = os.stat(f).st_mode
    except OSError as e:
        raise UserError(f"cannot read {f}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"input {f} (found by {pat}) is not a regular file (a device, FIFO or socket); "
                        f"remove it, or name the files to read")


def _glob(pat: str) -> list[str]:
    """``glob.glob(pat, recursive=True)``, sorted, except that ``**`` enters each directory once
    (by device and inode): glob follows a link back up (``ln -s . loop``) at every level, and
    two such links make that exponential."""
    parts = pat.split(os.sep)
    if "**" not in parts:
        return sorted(glob.glob(pat))
    i = parts.index("**")
    head, tail = os.sep.join(parts[:i]) or (os.sep if i else ""), parts[i + 1:]
    out = set()
    for base in (glob.glob(head) if glob.has_magic(head) else [head]):
        if base and not os.path.isdir(base):
            continue
        for rel in _tree(base, files=not tail):
            path = os.path.join(base, rel)
            if tail:
                out.update(_glob(os.path.join(glob.escape(path), *tail)))
            elif path:
                out.add(path)
    return sorted(out)


def _tree(base: str, files: bool) -> Iterator[str]:
    """The non-hidden directories under ``base`` as paths relative to it (``""``: itself), each
    entered once, the first way it is reached; with ``files``, their other entries too."""
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        d = os.path.join(base, rel) or os.curdir
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
        except OSError:
            continue
        yield rel
        if files:
            yield from (os.path.join(rel, name) for name, is_dir in entries if not is_dir)
        stack.extend(os.path.join(rel, name) for name, is_dir in reversed(entries) if is_dir)


# File names a reader knows, so a directory walk reads them (and nothing else).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
KNOWN_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".parquet", *TEXT_SUFFIXES)


def _walk(d: Path) -> list[Path]:
    """The files of a known format under ``d`` (hidden entries skipped), sorted; a save_to_disk
    split's Arrow files in its ``state.json`` order."""
    out: list[Path] = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if hf_disk.STATE in files:
            out.extend(hf_disk.arrow_files(Path(root)))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith(".") and has_known_format(f))
    return out


def has_known_format(name: str) -> bool:
    return name.lower().endswith(KNOWN_SUFFIXES)


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):  # named, globbed, or listed by a save_to_disk split's state.json
        return "arrow"
    return "text"


# A file bigger than this is read as several units (``file_spans``); ``data prepare --unit-bytes``.
UNIT_BYTES = 256 << 20
MIN_UNIT_BYTES = 4 << 10
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"64M"`` -> 67108864: a whole number of bytes with an optional K, M, G or T (powers of 1024;
    ``KiB`` / ``KB`` spellings too). ``UserError`` for anything else or below ``MIN_UNIT_BYTES``."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t[-1:] in _SIZE_SUFFIXES else (t, "")
    if not num.isdigit():
        raise UserError(f"--unit-bytes: {text!r} is not a size such as 268435456, 256M or 1G")
    n = int(num) * _SIZE_SUFFIXES[unit]
    if n < MIN_UNIT_BYTES:
        raise UserError(f"--unit-bytes must be at least {MIN_UNIT_BYTES} (4K), got {text}")
    return n


@dataclass(frozen=True)
class Span:
    """Part ``part`` of a file read as a unit of its own: bytes [start, end) of an uncompressed
    JSONL file, or row groups [start, end) of a Parquet file (``nbytes`` of them, compressed)."""

    part: int
    start: int
    end: int
    nbytes: int


def file_spans(path: Path, size: int, unit_bytes: int) -> list[Span]:
    """The parts to read a file of ``size`` bytes in, about ``unit_bytes`` each; ``[]`` for one unit
    (the whole file: small, compressed, plain text, Arrow, or a Parquet file with one row group)."""
    if size <= unit_bytes:
        return []
    kind = file_kind(path)
    if kind == "jsonl":
        n = -(-size // unit_bytes)
        return [Span(i, i * unit_bytes, min(size, (i + 1) * unit_bytes),
                     min(size, (i + 1) * unit_bytes) - i * unit_bytes) for i in range(n)]
    return _row_group_spans(path, unit_bytes) if kind == "parquet" else []


def _row_group_spans(path: Path, unit_bytes: int) -> list[Span]:
    """Contiguous row groups of about ``unit_bytes`` compressed bytes each (a part ends at the
    first group that reaches it); ``[]`` when that is one part or the footer cannot be read (the
    reader then reports the file)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        sizes = [sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
                 for rg in map(meta.row_group, range(meta.num_row_groups))]
    except Exception:  # pyarrow raises several types for a damaged file
        return []
    spans: list[Span] = []
    start = acc = 0
    for g, n in enumerate(sizes):
        acc += n
        if acc >= unit_bytes or g == len(sizes) - 1:
            spans.append(Span(len(spans), start, g + 1, acc))
            start, acc = g + 1, 0
    return spans if len(spans) > 1 else []


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class SourceConfig:
    """One named input source of the mixture."""

    name: str
    """The source's name in the manifest's accounting (no "/")."""
    paths: list[str]
    """Files, directories and globs (relative to the config file); a directory gives only files of the known formats."""
    text_field: str = "text"
    """The JSONL / Parquet field holding the document's text."""
    url_field: str | None = None
    """The field holding the document's URL, for the site blocklist; none: no URL."""
    weight: float = setting(1.0, between(0, 1000, "(]"))
    """2.0: seen twice per pass (up-sampling); 0.5: a deterministic half."""
    quality: bool | None = None
    """None: the config's quality stages; False: skip them (code)."""


# The stages, in pipeline order, with their defaults (``[stages.<name>]`` in a config overrides any
# key). Field order is the order of the manifest's "stages": keep it.


@dataclass
class NormalizeStage:
    enabled: bool = True
    """Normalise line endings, control characters and lone surrogates, NFC, trailing spaces."""
    fix_encoding: bool = True
    """Repair mojibake with ftfy first."""


@dataclass
class BlocklistStage:
    enabled: bool = True
    """Drop documents whose URL is on a blocked site (subdomains included)."""
    default_list: bool = True
    """Block the sites of data/blocklists/default.txt (people-search, background-check, public records)."""
    domains: list[str] = field(default_factory=list)
    """More domains to block."""
    files: list[str] = field(default_factory=list)
    """More blocklist files, one domain a line."""


@dataclass
class PiiStage:
    enabled: bool = False
    """Replace personal information with placeholders (<EMAIL_ADDRESS> ...)."""
    emails: bool = True
    """E-mail addresses."""
    phones: bool = True
    """Phone numbers."""
    ips: bool = True
    """IP addresses."""


@dataclass
class GopherQualityStage:
    enabled: bool = True
    """Gopher's quality rules (datatrove's thresholds): a document outside any bound is dropped."""
    min_words: int = 50
    """Fewest words (pure-symbol words not counted)."""
    max_words: int = 100_000
    """Most words."""
    min_mean_word_length: float = 3.0
    """Shortest mean word length, in characters."""
    max_mean_word_length: float = 10.0
    """Longest mean word length, in characters."""
    max_symbol_word_ratio: float = 0.1
    """Most "#", "..." and "…" per word."""
    max_bullet_lines_ratio: float = 0.9
    """Largest share of lines that start with a bullet."""
    max_ellipsis_lines_ratio: float = 0.3
    """Largest share of lines that end with an ellipsis."""
    min_alpha_words_ratio: float = 0.8
    """Smallest share of words that hold a letter."""
    min_stop_words: int = 2
    """Fewest English stop words (the, be, to, of, and, that, have, with)."""


@dataclass
class GopherRepetitionStage:
    enabled: bool = True
    """Gopher's repetition rules: a document over any limit is dropped."""
    dup_line_frac: float = 0.3
    """Largest share of lines that repeat an earlier line."""
    dup_para_frac: float = 0.3
    """Largest share of paragraphs that repeat an earlier one."""
    dup_line_char_frac: float = 0.2
    """Largest share of characters in repeated lines."""
    dup_para_char_frac: float = 0.2
    """Largest share of characters in repeated paragraphs."""
    top_ngram_char_frac: list[tuple[int, float]] = field(default_factory=lambda: [
        (2, 0.20), (3, 0.18), (4, 0.16)])
    """(n, limit): drop when the most frequent n-gram covers more than ``limit`` of the characters."""
    dup_ngram_char_frac: list[tuple[int, float]] = field(default_factory=lambda: [
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
    """(n, limit): drop when repeated n-grams cover more than ``limit`` of the characters."""


@dataclass
class C4Stage:
    enabled: bool = True
    """C4's rules: lines dropped by the rules below; the document dropped by the document rules."""
    min_words_per_line: int = 3
    """Drop lines with fewer words."""
    min_sentences: int = 5
    """Drop the document when fewer sentences remain."""
    max_word_length: int = 1000
    """Drop lines holding a longer word (characters)."""
    terminal_punct: bool = True
    """Drop lines that do not end in terminal punctuation or a closing quote, or end in "..."."""
    lorem_ipsum: bool = True
    """Drop documents that contain "lorem ipsum"."""
    javascript: bool = True
    """Drop lines that mention javascript."""
    curly_bracket: bool = False
    """Drop documents that contain a curly bracket."""
    policy: bool = True
    """Drop lines that mention terms of use, privacy or cookie policies."""


@dataclass
class ExactDedupStage:
    enabled: bool = True
    """Drop exact duplicates (xxh3 of the lower-cased, whitespace-collapsed text); the first is kept."""


@dataclass
class NearDedupStage:
    enabled: bool = True
    """Drop near duplicates (MinHash LSH, datasketch's permutations); the first is kept."""
    ngram: int = 5
    """Words per shingle."""
    bands: int = 14
    """LSH bands: two documents are duplicates when every row of some band agrees."""
    rows: int = 8
    """Rows (MinHash permutations) per band."""
    seed: int = 1
    """Seed of the MinHash permutations."""


@dataclass
class Stages:
    normalize: NormalizeStage = field(default_factory=NormalizeStage)
    blocklist: BlocklistStage = field(default_factory=BlocklistStage)
    pii: PiiStage = field(default_factory=PiiStage)
    gopher_quality: GopherQualityStage = field(default_factory=GopherQualityStage)
    gopher_repetition: GopherRepetitionStage = field(default_factory=GopherRepetitionStage)
    c4: C4Stage = field(default_factory=C4Stage)
    exact_dedup: ExactDedupStage = field(default_factory=ExactDedupStage)
    near_dedup: NearDedupStage = field(default_factory=NearDedupStage)


# The defaults as plain dicts, the form the filter functions take.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = asdict(Stages())

QUALITY_STAGES = ("gopher_quality", "gopher_repetition", "c4")


@dataclass
class DataConfig:
    """A data config: the sources plus stage and output settings."""

    sources: list[SourceConfig]
    stages: Stages = field(default_factory=Stages)
    seed: int = 0
    """Seed of the validation split and of fractional source weights."""
    val_fraction: float = setting(0.005, between(0, 0.5, "[)"))
    """Share of documents (by content hash) held out for validation; never empty when >= 2 documents are kept."""
    shard_tokens: int = setting(1 << 28, at_least(1024))
    """Tokens per output shard file (shards end at document boundaries)."""
    path: str | None = None
    """The file it was loaded from, if any."""

    def to_dict(self) -> dict[str, Any]:
        return {"sources": [asdict(s) for s in self.sources], "stages": asdict(self.stages),
                "seed": self.seed, "val_fraction": self.val_fraction, "shard_tokens": self.shard_tokens}

    def validate(self) -> "DataConfig":
        if not self.sources:
            raise UserError("data config has no sources")
        names = set()
        for s in self.sources:
            if not s.name or not isinstance(s.name, str) or "/" in s.name:
                raise UserError(f"source name {s.name!r} must be a non-empty string without '/'")
            if s.name in names:
                raise UserError(f"source name {s.name!r} appears twice")
            names.add(s.name)
            check(s, f"source {s.name}: ")
            if not s.paths:
                raise UserError(f"source {s.name}: no paths")
        check(self)
        return self


# Keys of a data config table besides ``sources``; ``tokenizer`` is allowed and ignored.
_TABLE_KEYS = ("stages", "seed", "val_fraction", "shard_tokens")


def _source_from_dict(d: Any, base: Path | None, i: int, origin: str) -> SourceConfig:
    if not isinstance(d, dict):
        raise UserError(f"{origin}sources[{i}] must be a table")
    if "name" not in d or "paths" not in d:
        raise UserError(f"{origin}sources[{i}] needs 'name' and 'paths'")
    where = f"{origin}source {d['name']}: "
    paths = coerce([d["paths"]] if isinstance(d["paths"], str) else d["paths"], list[str], where + "paths")
    if base is not None:  # relative paths are relative to the config file
        paths = [p if os.path.isabs(os.path.expanduser(p)) else str(base / p) for p in paths]
    rest = {k: v for k, v in d.items() if k not in ("name", "paths")}
    return update(SourceConfig(name=d["name"], paths=paths), rest, where)


def data_config_from_dict(d: dict[str, Any], base: Path | None = None, path: str | None = None) -> DataConfig:
    if "sources" not in d and isinstance(d.get("data"), dict):
        d = d["data"]  # a run config with a [data] section
    origin = f"{path}: " if path else "data config: "
    unknown = set(d) - {"sources", "tokenizer", *_TABLE_KEYS}
    if unknown:
        raise UserError(f"{origin}unknown key(s) {', '.join(sorted(unknown))}; "
                        f"known: sources, {', '.join(_TABLE_KEYS)}")
    sources = d.get("sources")
    if not isinstance(sources, list):
        raise UserError(f"{origin}no [[sources]] entries (a data config needs them)")
    cfg = DataConfig([_source_from_dict(s, base, i, origin) for i, s in enumerate(sources)], path=path)
    update(cfg, {k: d[k] for k in _TABLE_KEYS if k in d}, origin)
    return cfg.validate()


def load_data_config(path: str | Path) -> DataConfig:
    """Read a TOML data config (top-level ``[[sources]]`` or a run config's ``[data]`` section)."""
    from ..config import read_toml

    path = Path(path)
    return data_config_from_dict(read_toml(path), base=path.parent, path=str(path))


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class Record:
    """One input record: ``text`` is None when the record is bad, and ``error`` (from ``drops``) says why."""

    text: str | None
    url: str | None
    loc: str  # file:line (JSONL), file:row N (Parquet) or file (text)
    error: str | None = None

    @classmethod
    def bad(cls, loc: str, error: str) -> Record:
        return cls(None, None, loc, error)


def iter_texts(source: SourceConfig) -> Iterator[str]:
    """Document texts of a source, bad records skipped."""
    for path in expand_paths(source.paths):
        for rec in iter_records(path, source.text_field, source.url_field):
            if rec.text is not None:  # None: a bad record
                yield rec.text


def iter_records(path: Path, text_field: str = "text", url_field: str | None = None,
                 span: Span | None = None) -> Iterator[Record]:
    """The records of ``path`` (of its part ``span``, from ``file_spans``: the records of the
    whole file are those of its parts, in order, with the same locations)."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        regular = False
    if not regular:  # expand_paths refuses these; this is for one that replaced a file since
        yield Record.bad(str(path), drops.UNREADABLE_FILE)
        return
    kind = file_kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path, text_field, url_field, span)
    elif kind == "arrow":
        yield from _iter_arrow(path, text_field, url_field)
    elif kind == "text":
        yield _read_text_file(path)
    else:
        yield from _iter_jsonl(path, text_field, url_field, gz=kind == "jsonl.gz", span=span)


def _read_text_file(path: Path) -> Record:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limits.MAX_RECORD_BYTES + 1)
    except OSError:
        return Record.bad(str(path), drops.UNREADABLE_FILE)
    if len(data) > limits.MAX_RECORD_BYTES:
        return Record.bad(str(path), drops.TOO_LONG)
    if not data.strip():
        return Record.bad(str(path), drops.EMPTY_FILE)
    if b"\x00" in data[:65536]:
        return Record.bad(str(path), drops.BINARY_FILE)
    try:
        return Record(data.decode("utf-8"), None, str(path))
    except UnicodeDecodeError:
        return Record.bad(str(path), drops.INVALID_UTF8)


class _FieldsSeen:
    """What a JSONL file's objects held, for the error when none has the text field."""

    def __init__(self) -> None:
        self.objects = 0
        self.with_field = 0
        self.fields: dict[str, None] = {}


def _json_record(raw: bytes, loc: str, text_field: str, url_field: str | None, seen: _FieldsSeen) -> Record:
    """One JSONL line as a record (a bad one counted by its reason)."""
    if b"\x00" in raw:
        return Record.bad(loc, drops.BINARY_DATA)
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record.bad(loc, drops.INVALID_UTF8)
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # nested thousands deep: malformed, too
        return Record.bad(loc, drops.MALFORMED_JSON)
    if not isinstance(obj, dict):
        return Record.bad(loc, drops.MALFORMED_JSON)
    seen.objects += 1
    if len(seen.fields) < 50:
        for k in obj:
            seen.fields.setdefault(str(k), None)
    if text_field not in obj:
        return Record.bad(loc, drops.MISSING_TEXT_FIELD)
    seen.with_field += 1
    text = obj[text_field]
    if not isinstance(text, str):
        return Record.bad(loc, drops.TEXT_NOT_A_STRING)
    url = obj.get(url_field) if url_field else None
    return Record(text, url if isinstance(url, str) else None, loc)


def _iter_jsonl(path: Path, text_field: str, url_field: str | None, gz: bool,
                span: Span | None = None) -> Iterator[Record]:
    """The records of a JSONL file, or of its lines that start in ``span``'s byte range. Of a file's
    parts, only the first reports an empty file, and only when the whole file is blank; the text
    field is looked for per part (a part of JSON objects none of which has it is refused)."""
    seen = _FieldsSeen()
    empty = True
    try:
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError:
        yield Record.bad(str(path), drops.UNREADABLE_FILE)
        return
    with fh:
        lineno = 0
        try:
            first, lines = (1, fh) if span is None else _seek_span(fh, span)
            lineno = first - 1
            for lineno, raw in enumerate(limits.bounded_lines(lines, limits.MAX_RECORD_BYTES), first):
                if raw is None:
                    empty = False
                    yield Record.bad(f"{path}:{lineno}", drops.TOO_LONG)
                elif raw.strip():
                    empty = False
                    yield _json_record(raw, f"{path}:{lineno}", text_field, url_field, seen)
            if empty and span is not None:  # one part is blank: the whole file, or only that part?
                empty = span.part == 0 and _blank(fh)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
            empty = False
            yield Record.bad(f"{path}:{lineno + 1}", drops.CORRUPT_FILE)
    if empty:
        yield Record.bad(str(path), drops.EMPTY_FILE)
    elif seen.objects and not seen.with_field:
        raise UserError(f"{path}: no record has the text field {text_field!r}; "
                        f"fields present: {', '.join(seen.fields) or 'none'}")


class _ByteRange:
    """``readline`` over the lines of a binary file that start before ``end``, from ``pos`` (a line
    start): a line that starts in the range is read whole, past ``end`` if it goes on."""

    def __init__(self, fh, pos: int, end: int):
        self.fh, self.pos, self.end, self.at_line_start = fh, pos, end, True

    def readline(self, size: int) -> bytes:
        if self.at_line_start and self.pos >= self.end:
            return b""
        line = self.fh.readline(size)
        self.pos += len(line)
        self.at_line_start = line.endswith(b"\n")
        return line


_COUNT_CHUNK = 16 << 20


def _seek_span(fh, span: Span) -> tuple[int, _ByteRange]:
    """The line number of ``span``'s first line and a reader of its lines. A range that starts
    mid-line starts at the next line (that line belongs to the range before); the lines before it
    are counted, so that locations read ``file:line`` as for the whole file."""
    pos = span.start
    if pos > 0:
        fh.seek(pos - 1)
        if fh.read(1) != b"\n":
            while True:
                chunk = fh.readline(_COUNT_CHUNK)
                if not chunk or chunk.endswith(b"\n"):
                    break
            pos = fh.tell()
    fh.seek(0)
    newlines, left = 0, pos
    while left > 0:
        chunk = fh.read(min(_COUNT_CHUNK, left))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        left -= len(chunk)
    fh.seek(pos)
    return newlines + 1, _ByteRange(fh, pos, span.end)


def _blank(fh) -> bool:
    """Whether the rest of ``fh`` (from a line start) is blank lines, as the whole-file reader sees
    them (a blank line over the record limit is a too-long record, not blank)."""
    return all(raw is not None and not raw.strip() for raw in limits.bounded_lines(fh, limits.MAX_RECORD_BYTES))


def _iter_parquet(path: Path, text_field: str, url_field: str | None,
                  span: Span | None = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception:  # pyarrow raises several types for a damaged or non-Parquet file
        if path.stat().st_size == 0:
            yield Record.bad(str(path), drops.EMPTY_FILE)
        else:
            yield Record.bad(str(path), drops.CORRUPT_FILE)
        return
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path}: no column {text_field!r}; columns: {', '.join(schema.names) or 'none'}")
    if pf.metadata.num_rows == 0:
        yield Record.bad(str(path), drops.EMPTY_FILE)
        return
    read_text = _readable(schema.field(text_field).type)
    cols = _columns(schema, text_field, url_field)
    n = pf.metadata.num_row_groups
    groups = range(n) if span is None else range(min(span.start, n), min(span.end, n))
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    try:
        with open(path, "rb") as fh:
            for g in groups:
                for rec in _row_group_records(pf, fh, g, cols, read_text, str(path), row):
                    row += 1
                    yield rec
    except Exception:
        yield Record.bad(f"{path}:row {row + 1}", drops.CORRUPT_FILE)


def _iter_arrow(path: Path, text_field: str, url_field: str | None) -> Iterator[Record]:
    """The rows of an Arrow stream file (a save_to_disk split's), checked as Parquet rows are: each
    text (and URL) measured in the memory-mapped batch before it becomes a Python string."""
    if path.stat().st_size == 0:
        yield Record.bad(str(path), drops.EMPTY_FILE)
        return
    row = 0
    try:
        with hf_disk.open_stream(path) as reader:
            schema = reader.schema
            if text_field not in schema.names:
                raise UserError(f"{path}: no column {text_field!r}; columns: {', '.join(schema.names) or 'none'}")
            read_text = _readable(schema.field(text_field).type)
            cols = _columns(schema, text_field, url_field)
            for batch in reader:
                recs = (_batch_records(batch.select(cols), str(path), row) if read_text else
                        (Record.bad(f"{path}:row {i}", drops.TEXT_NOT_A_STRING)
                         for i in range(row + 1, row + batch.num_rows + 1)))
                for rec in recs:
                    row += 1
                    yield rec
    except UserError:
        raise
    except Exception:  # not an Arrow stream, truncated, compressed (hf_disk.CompressedStream)
        yield Record.bad(f"{path}:row {row + 1}" if row else str(path), drops.CORRUPT_FILE)
        return
    if row == 0:
        yield Record.bad(str(path), drops.EMPTY_FILE)


def _columns(schema, text_field: str, url_field: str | None) -> list[str]:
    """The columns read: the text's, and the URL's when it holds strings."""
    url = url_field and url_field in schema.names and limits.is_string_type(schema.field(url_field).type)
    return [text_field] + ([url_field] if url and url_field else [])


def _readable(t) -> bool:
    """Whether a text column is read: strings (measured before they are decoded) and fixed-width
    values (for their nulls). Binary or nested values may decode to anything, from a few bytes,
    and are not texts whatever they hold."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return limits.is_string_type(t) or pa.types.is_null(t) or pa.types.is_primitive(t)


def _row_group_records(pf, fh, g: int, cols: list[str], read_text: bool, path: str,
                       row: int) -> Iterator[Record]:
    """The records of row group ``g`` (rows from ``row + 1``), in batches whose decoded size its
    metadata and dictionary page headers bound; a row group whose rows average more than the
    record limit is not read at all."""
    meta = pf.metadata.row_group(g)
    rows = meta.num_rows
    size = limits.declared_bytes(meta, pf.metadata.schema, cols)
    if not read_text or limits.mean_row_over_limit(rows, size):
        reason = drops.TOO_LONG if read_text else drops.TEXT_NOT_A_STRING
        yield from (Record.bad(f"{path}:row {i}", reason) for i in range(row + 1, row + rows + 1))
        return
    dictionary = limits.dictionary_bytes(fh, meta, pf.metadata.schema, cols)
    for batch in pf.iter_batches(batch_size=limits.rows_per_batch(rows, size, dictionary), row_groups=[g],
                                 columns=cols):
        yield from _batch_records(batch, path, row)
        row += batch.num_rows


def _batch_records(batch, path: str, row: int) -> Iterator[Record]:
    """A batch's records: text (and URL) lengths first, so a row over the limit is dropped
    before it becomes a Python string."""
    text = batch.column(0)
    url = batch.column(1) if batch.num_columns > 1 else None
    sizes = limits.string_lengths(text)
    if sizes is None:  # numbers or nulls
        for i, null in enumerate(text.is_null().to_numpy(zero_copy_only=False), row + 1):
            yield Record.bad(f"{path}:row {i}", drops.MISSING_TEXT_FIELD if null else drops.TEXT_NOT_A_STRING)
        return
    if url is not None:
        sizes = sizes + limits.string_lengths(url)
    over = sizes > limits.MAX_RECORD_BYTES
    for a, b in limits.slices(sizes * ~over, limits.PARQUET_BATCH_BYTES):
        texts = limits.pylist(text, a, b, over)
        urls = limits.pylist(url, a, b, over) if url is not None else [None] * (b - a)
        for i in range(a, b):
            loc = f"{path}:row {row + i + 1}"
            if over[i]:
                yield Record.bad(loc, drops.TOO_LONG)
            elif texts[i - a] is None:
                yield Record.bad(loc, drops.MISSING_TEXT_FIELD)
            else:
                yield Record(texts[i - a], urls[i - a], loc)
