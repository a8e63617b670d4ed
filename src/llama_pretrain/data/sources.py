"""Input side of the data pipeline: finding files, the TOML data config, reading documents.

Supported inputs (by file name):

* ``*.jsonl`` / ``*.jsonl.gz`` / ``*.json.gz``: one JSON object per line, text in ``text_field``;
* ``*.parquet``: one row per document, text in the column ``text_field``;
* anything else: a plain-text file is one document (directories are walked recursively).

Bad records never raise: ``iter_records`` yields them with a drop reason and a ``file:line``
location so the pipeline can count them (``--strict`` turns the first one into a ``UserError``).
The one exception is a file in which *no* record has the configured text field: that is a
configuration mistake, reported as a ``UserError`` naming the file and the fields it does have.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError

# ---------------------------------------------------------------------------------------------
# Files


def expand_paths(patterns: list[str] | str) -> list[Path]:
    """Files named by ``patterns``: files, directories (recursive, hidden entries skipped) and
    globs (``**`` allowed). Order is deterministic (sorted per pattern, first occurrence wins).
    Raises ``UserError`` naming the first pattern that matches no file."""
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
            for m in sorted(glob.glob(pat, recursive=True)):
                mp = Path(m)
                found.extend(_walk(mp) if mp.is_dir() else [mp] if mp.is_file() else [])
        else:
            raise UserError(f"input path {pat} does not exist")
        if not found:
            raise UserError(f"input {pat} matches no files")
        for f in found:
            seen.setdefault(f, None)
    return list(seen)


def _walk(d: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class SourceConfig:
    """One named input source of the mixture."""

    name: str
    paths: list[str]
    text_field: str = "text"
    url_field: str | None = None
    weight: float = 1.0  # 2.0: seen twice per pass (up-sampling); 0.5: a deterministic half
    quality: bool | None = None  # None: the config's quality stages; False: skip them (code)


# Stage settings with their defaults; a config may override any key, and unknown keys are errors.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "normalize": {"enabled": True, "fix_encoding": True},
    "blocklist": {"enabled": True, "default_list": True, "domains": [], "files": []},
    "pii": {"enabled": False, "emails": True, "phones": True, "ips": True},
    "gopher_quality": {
        "enabled": True, "min_words": 50, "max_words": 100_000, "min_mean_word_length": 3.0,
        "max_mean_word_length": 10.0, "max_symbol_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9,
        "max_ellipsis_lines_ratio": 0.3, "min_alpha_words_ratio": 0.8, "min_stop_words": 2,
    },
    "gopher_repetition": {
        "enabled": True, "dup_line_frac": 0.3, "dup_para_frac": 0.3, "dup_line_char_frac": 0.2,
        "dup_para_char_frac": 0.2,
        "top_ngram_char_frac": [[2, 0.20], [3, 0.18], [4, 0.16]],
        "dup_ngram_char_frac": [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]],
    },
    "c4": {
        "enabled": True, "min_words_per_line": 3, "min_sentences": 5, "max_word_length": 1000,
        "terminal_punct": True, "lorem_ipsum": True, "javascript": True, "curly_bracket": False,
        "policy": True,
    },
    "exact_dedup": {"enabled": True},
    "near_dedup": {"enabled": True, "ngram": 5, "bands": 14, "rows": 8, "seed": 1},
}

QUALITY_STAGES = ("gopher_quality", "gopher_repetition", "c4")


@dataclass
class DataConfig:
    """A data config: the sources plus stage and output settings."""

    sources: list[SourceConfig]
    stages: dict[str, dict[str, Any]] = field(default_factory=lambda: _stage_defaults())
    seed: int = 0
    val_fraction: float = 0.005
    shard_tokens: int = 1 << 28  # tokens per output shard file (shards end at document boundaries)
    path: str | None = None  # the file it was loaded from, if any

    def stage(self, name: str) -> dict[str, Any]:
        return self.stages[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [s.__dict__.copy() for s in self.sources],
            "stages": self.stages, "seed": self.seed, "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens,
        }

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
            if not isinstance(s.weight, (int, float)) or not (s.weight > 0) or s.weight > 1000:
                raise UserError(f"source {s.name}: weight must be a number in (0, 1000], got {s.weight!r}")
            if not s.paths:
                raise UserError(f"source {s.name}: no paths")
        if not (0.0 <= self.val_fraction < 0.5):
            raise UserError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if int(self.shard_tokens) < 1024:
            raise UserError(f"shard_tokens must be >= 1024, got {self.shard_tokens}")
        return self


def _stage_defaults() -> dict[str, dict[str, Any]]:
    return json.loads(json.dumps(STAGE_DEFAULTS))  # deep copy


def merge_stages(overrides: dict[str, Any] | None, where: str = "stages") -> dict[str, dict[str, Any]]:
    stages = _stage_defaults()
    for name, values in (overrides or {}).items():
        if name not in stages:
            raise UserError(f"unknown stage [{where}.{name}]; known: {', '.join(stages)}")
        if not isinstance(values, dict):
            raise UserError(f"[{where}.{name}] must be a table")
        for k, v in values.items():
            if k not in stages[name]:
                raise UserError(f"unknown key {where}.{name}.{k}; known: {', '.join(stages[name])}")
            default = stages[name][k]
            ok = (isinstance(v, bool) if isinstance(default, bool)
                  else isinstance(v, (int, float)) and not isinstance(v, bool) if isinstance(default, (int, float))
                  else isinstance(v, type(default)))
            if not ok:
                raise UserError(f"{where}.{name}.{k} must be {type(default).__name__}, got {v!r}")
            stages[name][k] = v
    return stages


def _source_from_dict(d: Any, base: Path | None, i: int) -> SourceConfig:
    if not isinstance(d, dict):
        raise UserError(f"sources[{i}] must be a table")
    allowed = set(SourceConfig.__dataclass_fields__)
    unknown = set(d) - allowed
    if unknown:
        raise UserError(f"sources[{i}]: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}")
    if "name" not in d or "paths" not in d:
        raise UserError(f"sources[{i}] needs 'name' and 'paths'")
    paths = d["paths"]
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UserError(f"source {d['name']}: paths must be a list of strings")
    if base is not None:  # relative paths are relative to the config file
        paths = [p if os.path.isabs(os.path.expanduser(p)) else str(base / p) for p in paths]
    where = f"source {d['name']}"
    for key in ("text_field", "url_field"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise UserError(f"{where}: {key} must be a string, got {d[key]!r}")
    if d.get("quality") is not None and not isinstance(d["quality"], bool):
        raise UserError(f"{where}: quality must be true or false, got {d['quality']!r}")
    return SourceConfig(name=d["name"], paths=paths, text_field=d.get("text_field", "text"),
                        url_field=d.get("url_field"), weight=_number(d, "weight", 1.0, float, where),
                        quality=d.get("quality"))


def _number(d: dict[str, Any], key: str, default: float, kind: type, where: str = "data config"):
    """``d[key]`` as ``kind`` (int or float); a ``UserError`` naming the key for anything else."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise UserError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


def data_config_from_dict(d: dict[str, Any], base: Path | None = None, path: str | None = None) -> DataConfig:
    if "sources" not in d and isinstance(d.get("data"), dict):
        d = d["data"]  # a run config with a [data] section
    known = {"sources", "stages", "seed", "val_fraction", "shard_tokens", "tokenizer"}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"data config: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    sources = d.get("sources")
    if not isinstance(sources, list):
        raise UserError("data config needs [[sources]] entries")
    cfg = DataConfig(
        sources=[_source_from_dict(s, base, i) for i, s in enumerate(sources)],
        stages=merge_stages(d.get("stages")),
        seed=_number(d, "seed", 0, int), val_fraction=_number(d, "val_fraction", 0.005, float),
        shard_tokens=_number(d, "shard_tokens", 1 << 28, int), path=path,
    )
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
    """One input record: ``text`` is None when the record is bad, and ``error`` says why."""

    text: str | None
    url: str | None
    loc: str  # file:line (JSONL), file:row N (Parquet) or file (text)
    error: str | None = None


def iter_texts(source: SourceConfig) -> Iterator[str]:
    """Document texts of a source, bad records skipped."""
    for path in expand_paths(source.paths):
        for rec in iter_records(path, source.text_field, source.url_field):
            if rec.error is None:
                yield rec.text


def iter_records(path: Path, text_field: str = "text", url_field: str | None = None) -> Iterator[Record]:
    kind = file_kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path, text_field, url_field)
    elif kind == "text":
        yield _read_text_file(path)
    else:
        yield from _iter_jsonl(path, text_field, url_field, gz=kind == "jsonl.gz")


def _read_text_file(path: Path) -> Record:
    try:
        data = path.read_bytes()
    except OSError:
        return Record(None, None, str(path), "unreadable_file")
    if not data.strip():
        return Record(None, None, str(path), "empty_file")
    if b"\x00" in data[:65536]:
        return Record(None, None, str(path), "binary_file")
    try:
        return Record(data.decode("utf-8"), None, str(path))
    except UnicodeDecodeError:
        return Record(None, None, str(path), "invalid_utf8")


def _iter_jsonl(path: Path, text_field: str, url_field: str | None, gz: bool) -> Iterator[Record]:
    n_objects = 0
    n_with_field = 0
    fields_seen: dict[str, None] = {}
    empty = True
    try:
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError:
        yield Record(None, None, str(path), "unreadable_file")
        return
    with fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                empty = False
                loc = f"{path}:{lineno}"
                if b"\x00" in raw:
                    yield Record(None, None, loc, "binary_data")
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(None, None, loc, "invalid_utf8")
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    yield Record(None, None, loc, "malformed_json")
                    continue
                if not isinstance(obj, dict):
                    yield Record(None, None, loc, "malformed_json")
                    continue
                n_objects += 1
                if len(fields_seen) < 50:
                    for k in obj:
                        fields_seen.setdefault(str(k), None)
                if text_field not in obj:
                    yield Record(None, None, loc, "missing_text_field")
                    continue
                n_with_field += 1
                text = obj[text_field]
                if not isinstance(text, str):
                    yield Record(None, None, loc, "text_not_a_string")
                    continue
                url = obj.get(url_field) if url_field else None
                yield Record(text, url if isinstance(url, str) else None, loc)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
            empty = False
            yield Record(None, None, f"{path}:{lineno + 1}", "corrupt_file")
    if empty:
        yield Record(None, None, str(path), "empty_file")
    elif n_objects and not n_with_field:
        raise UserError(f"{path}: no record has the text field {text_field!r}; "
                        f"fields present: {', '.join(fields_seen) or 'none'}")


def _iter_parquet(path: Path, text_field: str, url_field: str | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception:  # pyarrow raises several types for a damaged or non-Parquet file
        if path.stat().st_size == 0:
            yield Record(None, None, str(path), "empty_file")
        else:
            yield Record(None, None, str(path), "corrupt_file")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column {text_field!r}; columns: {', '.join(names) or 'none'}")
    cols = [text_field] + ([url_field] if url_field and url_field in names else [])
    row = 0
    if pf.metadata.num_rows == 0:
        yield Record(None, None, str(path), "empty_file")
        return
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            texts = batch.column(0).to_pylist()
            urls = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
            for text, url in zip(texts, urls):
                row += 1
                loc = f"{path}:row {row}"
                if text is None:
                    yield Record(None, None, loc, "missing_text_field")
                elif not isinstance(text, str):
                    yield Record(None, None, loc, "text_not_a_string")
                else:
                    yield Record(text, url if isinstance(url, str) else None, loc)
    except Exception:
        yield Record(None, None, f"{path}:row {row + 1}", "corrupt_file")
