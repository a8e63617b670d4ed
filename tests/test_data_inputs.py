"""`data prepare` on inputs as people store them: Hugging Face ``save_to_disk`` directories
(Arrow streams, a DatasetDict's splits), sharded Parquet datasets, and one big JSONL or Parquet
file read as several units (``--unit-bytes``) with output identical to reading it whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_pretrain.cli import main
from llama_pretrain.data import limits

from helpers.synthetic_text import prose, prose_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return prose_tokenizer(tmp_path_factory.mktemp("tok"))


def run(*argv) -> int:
    return main(["data", *map(str, argv)])


def all_files(d: Path) -> dict[str, bytes]:
    """Every file of a dataset, manifest included, its work files left out."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "_work" not in p.parts}


def shards(d: Path) -> dict[str, bytes]:
    return {k: v for k, v in all_files(d).items() if k != "manifest.json"}


def accounting(d: Path) -> dict:
    """The manifest's accounting, the bad-record locations (which name the files) left out."""
    m = json.loads((d / "manifest.json").read_text())
    return {k: {**s, "bad_record_locations": None} for k, s in [("total", m["total"]), *m["sources"].items()]}


def unit_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "_work" / "units" / "input").iterdir())


def records(n: int, seed: int, too_long: bool = True) -> list[dict]:
    """Documents with the bad records a reader counts: no text, too long; an exact duplicate."""
    rng = random.Random(seed)
    rows = [{"text": prose(rng), "url": f"https://s{i}.org/"} for i in range(n)]
    rows[3] = {"text": None, "url": "https://x.org/"}                        # missing_text_field
    if too_long:
        rows[5] = {"text": "x" * (limits.MAX_RECORD_BYTES + 1), "url": None}
    rows[-1] = dict(rows[1])                                                  # exact_duplicate
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a null text is a missing field in Arrow and Parquet: leave the key out
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))


def save_to_disk(split_dir: Path, chunks: list[list[dict]], table_of=pa.Table.from_pylist) -> None:
    """A split as ``datasets.Dataset.save_to_disk`` writes it: one Arrow IPC stream per chunk,
    several record batches each, with dataset_info.json and state.json (listing them) beside."""
    split_dir.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(chunks):05d}.arrow" for i in range(len(chunks))]
    for name, rows in zip(names, chunks):
        table = table_of(rows)
        with pa.OSFile(str(split_dir / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=3)
    (split_dir / "dataset_info.json").write_text(json.dumps({"features": {}, "splits": {}}))
    (split_dir / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": split_dir.name}))


# -- Hugging Face save_to_disk ---------------------------------------------------------------------

def test_save_to_disk_dir_is_read_with_the_accounting_of_jsonl(tmp_path, tok):
    rows = records(24, seed=1)
    root = tmp_path / "hf"
    save_to_disk(root / "web" / "train", [rows[:12], rows[12:]])
    # not read: an Arrow file outside a saved split, a cache file beside dataset_info.json only, and
    # one in the split dir that state.json does not list
    arrow = (root / "web" / "train" / "data-00001-of-00002.arrow").read_bytes()
    (root / "cache").mkdir()
    (root / "cache" / "dataset_info.json").write_text("{}")
    for stray in (root / "stray.arrow", root / "cache" / "cache-1.arrow", root / "web" / "train" / "extra.arrow"):
        stray.write_bytes(arrow)
    write_jsonl(tmp_path / "js" / "a.jsonl", rows[:12])
    write_jsonl(tmp_path / "js" / "b.jsonl", rows[12:])

    common = ["--url-field", "url", "--tokenizer", tok, "--quiet", "--val-fraction", "0.1"]
    assert run("prepare", "--input", root, "--out", tmp_path / "o_hf", *common) == 0
    assert run("prepare", "--input", tmp_path / "js", "--out", tmp_path / "o_js", *common) == 0
    assert accounting(tmp_path / "o_hf") == accounting(tmp_path / "o_js")
    assert shards(tmp_path / "o_hf") == shards(tmp_path / "o_js")
    m = json.loads((tmp_path / "o_hf" / "manifest.json").read_text())["total"]
    assert m["files"] == 2 and m["documents_in"] == 24
    assert m["dropped"]["missing_text_field"] == m["dropped"]["too_long"] == m["dropped"]["exact_duplicate"] == 1
    first = root / "web" / "train" / "data-00000-of-00002.arrow"
    assert m["bad_record_locations"]["missing_text_field"] == [f"{first}:row 4"]
    assert m["bad_record_locations"]["too_long"] == [f"{first}:row 6"]


def test_dataset_dict_gives_every_split_in_sorted_order_or_the_one_named(tmp_path, tok):
    rng = random.Random(2)
    ds = tmp_path / "dd"
    for split in ("validation", "train"):
        save_to_disk(ds / split, [[{"text": prose(rng)} for _ in range(6)] + [{"text": None}]])
    (ds / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    common = ["--tokenizer", tok, "--quiet"]
    assert run("prepare", "--input", ds, "--out", tmp_path / "all", *common) == 0
    m = json.loads((tmp_path / "all" / "manifest.json").read_text())["total"]
    assert m["files"] == 2 and m["documents_in"] == 14
    assert m["bad_record_locations"]["missing_text_field"] == [
        f"{ds / s / 'data-00000-of-00001.arrow'}:row 7" for s in ("train", "validation")]
    assert run("prepare", "--input", ds / "validation", "--out", tmp_path / "val", *common) == 0
    m = json.loads((tmp_path / "val" / "manifest.json").read_text())["total"]
    assert m["files"] == 1 and m["documents_in"] == 7


def test_bad_arrow_inputs_are_counted_or_one_line_errors(tmp_path, tok, capsys):
    rng = random.Random(3)
    good = [{"text": prose(rng)} for _ in range(5)]
    d = tmp_path / "in"
    save_to_disk(d / "ok", [good])
    save_to_disk(d / "ints", [[{"text": i} for i in range(3)]])                      # text_not_a_string
    save_to_disk(d / "zstd", [good[:2]])                                              # compressed: corrupt
    table = pa.Table.from_pylist(good[:2])
    with pa.OSFile(str(d / "zstd" / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    save_to_disk(d / "torn", [good])                                                  # truncated: corrupt
    torn = d / "torn" / "data-00000-of-00001.arrow"
    torn.write_bytes(torn.read_bytes()[:-200])
    assert run("prepare", "--input", d, "--tokenizer", tok, "--quiet", "--out", tmp_path / "o") == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())["total"]
    assert m["dropped"]["text_not_a_string"] == 3
    assert m["dropped"]["corrupt_file"] == 2 and m["documents_in"] == 5 + 3 + 1 + 1
    save_to_disk(tmp_path / "other", [[{"body": "x"}]])
    capsys.readouterr()
    assert run("prepare", "--input", tmp_path / "other", "--tokenizer", tok, "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'text'; columns: body" in err[0]


# -- sharded Parquet -------------------------------------------------------------------------------

def test_sharded_parquet_dataset_is_one_unit_per_file_with_the_accounting_of_jsonl(tmp_path, tok):
    rows = records(24, seed=4, too_long=False)
    ds = tmp_path / "pq"
    (ds / "data").mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(rows[8 * i:8 * i + 8]), ds / "data" / f"train-{i:05d}-of-00003.parquet")
        write_jsonl(tmp_path / "js" / f"{i}.jsonl", rows[8 * i:8 * i + 8])
    (ds / "README.md.lock").write_text("")  # not a known format: skipped
    common = ["--url-field", "url", "--tokenizer", tok, "--quiet"]
    assert run("prepare", "--input", ds, "--out", tmp_path / "o_pq", *common, "--workers", "2") == 0
    assert run("prepare", "--input", tmp_path / "js", "--out", tmp_path / "o_js", *common) == 0
    assert unit_dirs(tmp_path / "o_pq") == ["000000", "000001", "000002"]
    assert accounting(tmp_path / "o_pq") == accounting(tmp_path / "o_js")
    assert shards(tmp_path / "o_pq") == shards(tmp_path / "o_js")


# -- one big file, several units ---------------------------------------------------------------------

def _big_jsonl(path: Path, seed: int) -> None:
    """~14 KB of documents with bad lines, blank lines, duplicates in other parts."""
    rng = random.Random(seed)
    docs = [prose(rng) for _ in range(24)]
    lines = [json.dumps({"text": t}) for t in docs]
    for i in range(5, 24, 7):
        lines[i] = json.dumps({"text": docs[i - 4]})      # exact duplicates, further on
    lines[9] = json.dumps({"text": docs[2] + " More."})  # a near duplicate
    lines.insert(12, "{not json")
    lines.insert(20, "")
    lines.insert(25, json.dumps({"body": "no text"}))
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad utf8\n" + b'{"text": "last, no newline."}')


def _big_parquet(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    docs = [prose(rng) for _ in range(24)]
    docs[20] = docs[4]  # a duplicate in another row group
    pq.write_table(pa.table({"text": docs[:10] + [None] + docs[10:]}), path, row_group_size=8, compression="none")


@pytest.fixture
def big_input(tmp_path) -> Path:
    d = tmp_path / "big"
    d.mkdir()
    _big_jsonl(d / "a.jsonl", 5)
    _big_parquet(d / "b.parquet", 6)
    return d


def test_one_big_file_as_several_units_gives_the_same_bytes_for_any_workers(tmp_path, tok, big_input):
    from llama_pretrain.data import prepare as prep
    from llama_pretrain.data.sources import DataConfig, SourceConfig

    common = ["--input", big_input, "--tokenizer", tok, "--quiet", "--val-fraction", "0.1"]
    assert run("prepare", *common, "--out", tmp_path / "whole") == 0
    assert run("prepare", *common, "--out", tmp_path / "w1", "--unit-bytes", "4K") == 0
    assert run("prepare", *common, "--out", tmp_path / "w2", "--unit-bytes", "4096", "--workers", "2") == 0
    units = unit_dirs(tmp_path / "w1")
    assert unit_dirs(tmp_path / "whole") == ["000000", "000001"]
    assert sum(u.startswith("000000-") for u in units) >= 3 and sum(u.startswith("000001-") for u in units) >= 3
    assert units[0] == "000000-0000" and units == unit_dirs(tmp_path / "w2")
    ref = all_files(tmp_path / "whole")
    assert all_files(tmp_path / "w1") == ref and all_files(tmp_path / "w2") == ref
    m = json.loads(ref["manifest.json"])
    assert m["total"]["files"] == 2 and m["total"]["dropped"]["exact_duplicate"] == 4
    assert m["total"]["bad_record_locations"]["malformed_json"] == [f"{big_input / 'a.jsonl'}:13"]
    assert "unit_bytes" not in json.dumps(m)
    # the part directories are this command's own (a rerun may replace them), and a rerun reuses them
    assert prep.dataset_foreign(tmp_path / "w1") is None
    cfg = DataConfig([SourceConfig("input", [str(big_input)])], val_fraction=0.1)
    jobs = prep.plan_units(cfg, tmp_path / "w1", prep.tokenizer_info(tok)["sha256"], tokenizer_path=str(tok),
                           unit_bytes=4096)
    assert [r.dir.name for r, _ in jobs] == units
    assert all(reused for _, reused in prep.run_units(jobs, progress=False))


def test_parts_spread_over_tasks_merge_to_the_same_bytes(tmp_path, tok, big_input):
    common = ["--input", big_input, "--tokenizer", tok, "--quiet", "--val-fraction", "0.1"]
    assert run("prepare", *common, "--out", tmp_path / "whole") == 0
    for i in range(2):
        assert run("prepare", *common, "--out", tmp_path / f"t{i}", "--unit-bytes", "4K",
                   "--num-tasks", "2", "--task-index", i) == 0
    part = json.loads((tmp_path / "t1" / "manifest.json").read_text())["part"]
    assert part["unit_bytes"] == 4096 and [u["part"] for u in part["units"]][:2] == [1, 3]
    assert run("merge", tmp_path / "t0", tmp_path / "t1", "--out", tmp_path / "merged", "--quiet") == 0
    assert shards(tmp_path / "merged") == shards(tmp_path / "whole")
    whole, merged = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "merged"))
    assert merged["total"] == whole["total"] and merged["sources"] == whole["sources"]
    # parts cut with another --unit-bytes would not fit together
    assert run("prepare", *common, "--out", tmp_path / "t1b", "--unit-bytes", "8K",
               "--num-tasks", "2", "--task-index", 1) == 0
    assert run("merge", tmp_path / "t0", tmp_path / "t1b", "--out", tmp_path / "bad", "--quiet") == 2


def test_parts_hold_the_records_of_the_whole_file_at_every_cut(tmp_path, monkeypatch):
    from llama_pretrain.data.sources import file_spans

    monkeypatch.setattr(limits, "MAX_RECORD_BYTES", 64)  # overlong lines, too, across the cuts
    path = tmp_path / "x.jsonl"
    lines = ["", json.dumps({"text": "a b c"}), " ", json.dumps({"text": "y" * 100}), "{bad", "\t" * 80,
             json.dumps({"text": "d e"}), json.dumps({"text": "f"}), "", ""]
    path.write_text("\n".join(lines) + "\n" + json.dumps({"text": "end"}))

    whole = recs_of(path, [None])
    size = path.stat().st_size
    for unit in range(1, size + 1):  # every cut: at a line start, mid-line, inside an overlong line
        assert recs_of(path, file_spans(path, size, unit) or [None]) == whole, unit
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \n\t\n" * 10)
    for unit in (1, 5, 16):  # an empty file once, by its first part, whatever the cut
        assert recs_of(blank, file_spans(blank, blank.stat().st_size, unit)) == [(None, str(blank), "empty_file")]


def recs_of(path: Path, spans) -> list[tuple]:
    from llama_pretrain.data.sources import iter_records

    return [(r.text, r.loc, r.error) for s in spans for r in iter_records(path, span=s)]


def test_parquet_parts_are_row_group_ranges_with_the_whole_files_rows(tmp_path):
    from llama_pretrain.data.sources import file_spans

    path = tmp_path / "b.parquet"
    _big_parquet(path, 7)
    size = path.stat().st_size
    whole = recs_of(path, [None])
    for unit in (1, 2000, 5000, 9000):
        spans = file_spans(path, size, unit)
        assert len(spans) >= 2 and spans[0].start == 0 and spans[-1].end == pq.ParquetFile(path).num_row_groups
        assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
        assert recs_of(path, spans) == whole
    assert len(file_spans(path, size, 1)) == pq.ParquetFile(path).num_row_groups  # never inside a row group
    assert file_spans(path, size, size) == []


def test_unit_bytes_sizes(tmp_path, tok, capsys):
    from llama_pretrain.data.sources import parse_bytes

    assert parse_bytes("64M") == parse_bytes("64MiB") == 64 << 20
    assert parse_bytes("1G") == 1 << 30 and parse_bytes("8192") == 8192 and parse_bytes("4k") == 4096
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": prose(random.Random(8))}) + "\n")
    for bad in ("12", "lots", "1.5G"):
        capsys.readouterr()
        assert run("prepare", "--input", f, "--tokenizer", tok, "--out", tmp_path / "o", "--unit-bytes", bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--unit-bytes" in err[0]
    assert not (tmp_path / "o").exists()
