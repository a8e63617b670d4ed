"""Small inputs, unbounded memory or time: each test is the attack, made in the test.

``data prepare`` and the eval reader run in a subprocess under an address-space limit and a
timeout. A record over the limit (a gzip line that never ends, a Parquet row that decodes to
gigabytes) must be dropped and counted, found without being read whole; a FIFO or a device in an
input directory must be refused in one line before anything is written; ``**`` must not wander
through symlink loops; a JSON line nested thousands deep is one malformed record.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llama_pretrain.data.limits import MAX_RECORD_BYTES, dictionary_page_bytes
from llama_pretrain.tokenizer import train_tokenizer

from helpers.synthetic_text import prose

# ``data prepare`` on JSONL maps ~200 MB, with pyarrow ~400 MB; every attack here used to need more.
JSONL_MEMORY = 512 << 20
PARQUET_MEMORY = 1 << 30
TIMEOUT = 60


def limited(args: list, memory: int, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python ARGS`` with its address space capped at ``memory`` bytes."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, *map(str, args)], preexec_fn=cap, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(5)
    return train_tokenizer([prose(rng) for _ in range(200)], d / "tok.model", 400, progress=False)


def corpus(d: Path) -> Path:
    """An input directory with a file of good documents, so that a run has something to keep."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    (d / "good.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(4)))
    return d


def prepare(tok: Path, out: Path, *inputs, memory: int = JSONL_MEMORY) -> subprocess.CompletedProcess:
    return limited(["-m", "llama_pretrain", "data", "prepare", "--input", *inputs, "--tokenizer", tok,
                    "--out", out, "--quiet", "--no-quality"], memory)


def dropped(r: subprocess.CompletedProcess, out: Path) -> dict:
    """The run's drop counts (it must have succeeded)."""
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())["total"]


def refused(r: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    """One line, exit 2, and nothing written (no ``_work/`` either)."""
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, r.stderr[-3000:]
    assert all(n in err for n in needles), err
    assert not out.exists()


# -- data prepare: records over the limit ----------------------------------------------------------
def test_gzip_line_without_end_is_dropped_as_too_long(tok, tmp_path):
    src = corpus(tmp_path / "in")
    head = gzip.compress(json.dumps({"text": prose(random.Random(2))}).encode() + b'\n{"text": "')
    # 32 gzip members of 8 MiB of "a" each: 260 KB on disk, one 256 MiB line once decompressed
    (src / "bomb.jsonl.gz").write_bytes(head + gzip.compress(b"a" * (8 << 20), 9) * 32)
    out = tmp_path / "out"
    total = dropped(prepare(tok, out, src), out)
    assert total["dropped"] == {"too_long": 1}
    assert total["documents_in"] == 4 + 2 and total["documents_kept"] == 5
    assert total["bad_record_locations"]["too_long"] == [f"{src}/bomb.jsonl.gz:2"]


def _dictionary_bomb(path: Path, column: str, **others) -> None:
    """100 rows that all repeat one dictionary entry of 20 MiB: 1 KB on disk, 2 GB decoded."""
    rows = pa.DictionaryArray.from_arrays(pa.array([0] * 100, pa.int32()), pa.array(["x" * (20 << 20)]))
    pq.write_table(pa.table({column: rows, **{k: [v] * 100 for k, v in others.items()}}), path,
                   compression="zstd", dictionary_pagesize_limit=1 << 30)


def _plain_bomb(path: Path, column: str, **others) -> None:
    """3 rows of 40 MiB each (a row group whose rows average over the limit)."""
    pq.write_table(pa.table({column: [c * (40 << 20) for c in "abc"], **{k: [v] * 3 for k, v in others.items()}}),
                   path, compression="zstd", use_dictionary=False)


@pytest.mark.parametrize("make, rows", [(_dictionary_bomb, 100), (_plain_bomb, 3)])
def test_parquet_rows_over_the_limit_are_dropped_without_being_decoded(tok, tmp_path, make, rows):
    src = corpus(tmp_path / "in")
    make(src / "bomb.parquet", "text")
    assert (src / "bomb.parquet").stat().st_size < 200_000 and 20 << 20 > MAX_RECORD_BYTES
    out = tmp_path / "out"
    total = dropped(prepare(tok, out, src, memory=PARQUET_MEMORY), out)
    assert total["dropped"] == {"too_long": rows}  # not corrupt_file: nothing failed to decode
    assert total["documents_in"] == 4 + rows
    assert total["bad_record_locations"]["too_long"][0] == f"{src}/bomb.parquet:row 1"


def test_json_line_nested_thousands_deep_is_one_malformed_record(tok, tmp_path):
    src = corpus(tmp_path / "in")
    (src / "deep.jsonl").write_text('{"text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
                                    + "[" * 100_000 + "\n")
    out = tmp_path / "out"
    total = dropped(prepare(tok, out, src), out)
    assert total["dropped"] == {"malformed_json": 2}
    assert total["bad_record_locations"]["malformed_json"] == [f"{src}/deep.jsonl:1", f"{src}/deep.jsonl:2"]


# -- data prepare: files that are not files ---------------------------------------------------------
def test_fifo_in_an_input_directory_is_refused(tok, tmp_path):
    src = corpus(tmp_path / "in")
    os.mkfifo(src / "stream.jsonl")  # no writer: opening it would block forever
    out = tmp_path / "out"
    refused(prepare(tok, out, src), out, f"{src}/stream.jsonl", "not a regular file")


@pytest.mark.parametrize("pattern", ["{src}", "{src}/**/*"])
def test_text_file_linked_to_dev_zero_is_refused(tok, tmp_path, pattern):
    src = corpus(tmp_path / "in")
    (src / "notes.txt").symlink_to("/dev/zero")  # endless: read whole, it fills any memory
    out = tmp_path / "out"
    refused(prepare(tok, out, pattern.format(src=src)), out, f"{src}/notes.txt", "not a regular file")


def test_glob_through_two_symlink_loops_visits_each_directory_once(tok, tmp_path):
    src = corpus(tmp_path / "in" / "sub").parent
    (src / "a").symlink_to(".")  # in/a/a/b/a/... is in/ again: 2^depth paths for glob's **
    (src / "b").symlink_to(".")
    (src / "sub" / "up").symlink_to("..")
    out = tmp_path / "out"
    r = prepare(tok, out, f"{src}/**/*.jsonl")
    total = dropped(r, out)
    assert total["files"] == 1 and total["documents_in"] == 4  # sub/good.jsonl, read once


# -- eval: a task's data file ---------------------------------------------------------------------
def load_piqa(data: Path, memory: int = PARQUET_MEMORY) -> subprocess.CompletedProcess:
    """The eval reader (``load_split``, as ``eval --data-dir`` calls it) on piqa's validation split."""
    code = ("import sys\n"
            "from llama_pretrain.errors import UserError\n"
            "from llama_pretrain.eval.tasks import TASKS\n"
            "from llama_pretrain.eval.tasks.data import load_split\n"
            "try:\n"
            f"    print(len(load_split(TASKS['piqa'], {str(data)!r}, 'validation')))\n"
            "except UserError as e:\n"
            "    print(e, file=sys.stderr)\n"
            "    sys.exit(2)\n")
    return limited(["-c", code], memory)


@pytest.mark.parametrize("make, where", [(_dictionary_bomb, "record 0"), (_plain_bomb, "records 0 to 2")])
def test_eval_parquet_row_over_the_limit_is_refused_without_being_decoded(tmp_path, make, where):
    (tmp_path / "piqa").mkdir()
    make(tmp_path / "piqa" / "validation.parquet", "goal", sol1="a", sol2="b", label=0)
    r = load_piqa(tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, r.stderr[-3000:]
    assert f"validation.parquet: {where}: a record larger than 16 MiB" in err, err


def test_eval_gzip_line_without_end_is_refused(tmp_path):
    (tmp_path / "piqa").mkdir()
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}).encode()
    (tmp_path / "piqa" / "validation.jsonl.gz").write_bytes(
        gzip.compress(good + b'\n{"goal": "') + gzip.compress(b"a" * (8 << 20), 9) * 32)
    r = load_piqa(tmp_path, JSONL_MEMORY)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, r.stderr[-3000:]
    assert "validation.jsonl.gz:2: a record larger than 16 MiB" in err, err


def test_eval_parquet_within_the_limits_reads_as_before(tmp_path):
    (tmp_path / "piqa").mkdir()
    recs = [{"goal": f"g{i}", "sol1": "same", "sol2": "b" * (1 << 20), "label": i % 2} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "piqa" / "validation.parquet")
    r = load_piqa(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "40", r.stderr[-3000:]


def test_dictionary_page_size_is_read_from_its_page_header(tmp_path):
    """The one size the metadata leaves out: what a batch of rows repeating a dictionary entry may
    decode to is bounded by it, so the walk over the page headers must find it, not give up."""
    words = [f"{i:0200d}" for i in range(1000)]  # 1000 distinct strings of 200 bytes
    pq.write_table(pa.table({"a": words * 3, "b": list(range(3000))}), tmp_path / "d.parquet",
                   data_page_size=256, write_batch_size=64)  # dozens of data pages, each header
    # with its statistics (the strings' min and max: longer than the first read of a header)
    pq.write_table(pa.table({"a": words}), tmp_path / "plain.parquet", use_dictionary=False)
    with open(tmp_path / "d.parquet", "rb") as fh:
        group = pq.ParquetFile(fh).metadata.row_group(0)
        assert dictionary_page_bytes(fh, group.column(0)) == 1000 * (4 + 200)  # length + bytes
        assert dictionary_page_bytes(fh, group.column(1)) == 3000 * 8
    with open(tmp_path / "plain.parquet", "rb") as fh:
        assert dictionary_page_bytes(fh, pq.ParquetFile(fh).metadata.row_group(0).column(0)) == 0
