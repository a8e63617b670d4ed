"""Reading a benchmark split: local JSONL / Parquet under DATA_DIR, or ``datasets`` from the Hub.

Layout: ``DATA_DIR/<task id>/<split>.jsonl`` (also ``.jsonl.gz``, ``.json``, ``.parquet``). A
benchmark published as several configurations (BBH's 27 tasks, AGIEval's English sets) may also
be laid out as ``DATA_DIR/<task id>/<config>/<split>.jsonl``; each record then gets a
``_subset`` field naming its configuration.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ...errors import UserError
from ...tokenizer import check_text

EXTS = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def find_split(data_dir: Path, task_id: str, split: str) -> list[tuple[Path, str | None]]:
    """Files holding ``split`` of ``task_id``: [(path, subset or None)]."""
    base = data_dir / task_id
    for ext in EXTS:
        if (base / f"{split}{ext}").is_file():
            return [(base / f"{split}{ext}", None)]
    found = []
    if base.is_dir():
        for sub in sorted(p for p in base.iterdir() if p.is_dir()):
            for ext in EXTS:
                if (sub / f"{split}{ext}").is_file():
                    found.append((sub / f"{split}{ext}", sub.name))
                    break
    return found


def read_records(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        opener = gzip.open if path.name.endswith(".gz") else open
        # invalid UTF-8 inside a string survives as U+DC80..U+DCFF, for check_fields to name its field
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as fh:
            if path.name.endswith(".json"):
                data = json.load(fh)
                if isinstance(data, dict):  # {"data": [...]} style
                    data = next((v for v in data.values() if isinstance(v, list)), [])
                return list(data)
            out = []
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError as e:
                        raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
            return out
    except UserError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for corrupt files
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def check_fields(records: list[dict], fields: tuple[str, ...], where: str, hf: str) -> None:
    """Each entry of ``fields`` is a name or alternatives joined by '|' (one of them must exist)."""
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: record {n} is a {type(rec).__name__}, expected an object")
        missing = [f for f in fields if not any(a in rec for a in f.split("|"))]
        if missing:
            found = ", ".join(sorted(k for k in rec if not k.startswith("_"))) or "none"
            raise UserError(f"{where}: record {n} lacks field(s) {', '.join(missing)}; expected the "
                            f"fields of {hf}: {', '.join(fields)}; found: {found}")
        for name, text in _strings(rec):
            check_text(text, f"{where}: record {n} field {name}")


def _strings(rec: dict):
    """(dotted field name, value) of every string in a record, nested ones included (no recursion)."""
    stack = [(str(k), v) for k, v in rec.items()]
    while stack:
        name, v = stack.pop()
        if isinstance(v, str):
            yield name, v
        elif isinstance(v, dict):
            stack.extend((f"{name}.{k}", x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{name}[{i}]", x) for i, x in enumerate(v))


def check_records(task, records: list[dict], where: str) -> None:
    """Every record is scorable (a multiple-choice answer is one of its choices) before any is scored."""
    for n, rec in enumerate(records):
        problem = task.problem(rec)
        if problem:
            raise UserError(f"{where}: record {n}: {problem}")


def load_split(task, data_dir: str | Path | None, split: str, required: bool = True) -> list[dict] | None:
    """Records of ``split`` for ``task`` (validated), or None when optional and absent."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        files = find_split(data_dir, task.id, split)
        if not files:
            if not required:
                return None
            where = data_dir / task.id
            hint = "" if data_dir.is_dir() else f" (--data-dir {data_dir} does not exist)"
            raise UserError(
                f"no {split!r} split for task {task.id}{hint}: put the {split} split of the Hugging "
                f"Face dataset {task.hf} at {where}/{split}.jsonl (or .parquet), one record per line "
                f"with fields {', '.join(task.fields)}")
        records = []
        for path, subset in files:
            recs = read_records(path)
            check_fields(recs, task.fields, str(path), task.hf)
            check_records(task, recs, str(path))
            if subset is not None:
                for r in recs:
                    r["_subset"] = subset
            records.extend(recs)
        return records
    return _load_hub(task, split, required)


def _load_hub(task, split: str, required: bool) -> list[dict] | None:
    try:
        import datasets
    except ImportError:
        if not required:
            return None
        raise UserError(f"task {task.id}: pass --data-dir DIR with {task.id}/{split}.jsonl (fields of "
                        f"{task.hf}: {', '.join(task.fields)}), or install `datasets` to download it") from None
    if " " in task.hf or "<" in task.hf:  # published as several repositories: no single download
        if not required:
            return None
        raise UserError(f"task {task.id}: download {task.hf} and lay it out as DATA_DIR/{task.id}/<sub-task>/"
                        f"{split}.jsonl, then pass --data-dir DATA_DIR")
    path, *configs = task.hf.split(":")
    configs = configs[0].split(",") if configs else [None]
    records = []
    for cfg in configs:
        try:
            ds = datasets.load_dataset(path, cfg, split=split)
        except ValueError:
            if not required:
                return None
            raise UserError(f"{task.hf}: no split {split!r}") from None
        except Exception as e:  # noqa: BLE001 - offline, gated, renamed: one line for the user
            if not required:
                return None
            raise UserError(f"cannot download {path} ({cfg or 'default'}): {str(e).splitlines()[0]}; "
                            f"use --data-dir with local files instead") from None
        for r in ds:
            r = dict(r)
            if len(configs) > 1:
                r["_subset"] = cfg
            records.append(r)
    check_fields(records, task.fields, task.hf, task.hf)
    check_records(task, records, task.hf)
    return records
