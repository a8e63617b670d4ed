"""`data prepare` / `data merge` end to end: accounting, round trip, mixture, determinism, resume,
bad input."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama_pretrain.cli import main
from llama_pretrain.data.normalize import normalize_text
from llama_pretrain.data.shards import iter_documents, open_tokens, read_manifest
from llama_pretrain.tokenizer import Tokenizer

from helpers.synthetic_text import prose, prose_tokenizer




def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return prose_tokenizer(tmp_path_factory.mktemp("tok"))


def run(*argv) -> int:
    return main(["data", *map(str, argv)])


def files_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "_work" not in p.parts and p.name != "manifest.json"}


# -- accounting and round trip ---------------------------------------------------------------------

def test_prepare_accounts_for_every_record_and_round_trips(tmp_path, tok, capsys):
    rng = random.Random(0)
    good = [prose(rng) for _ in range(40)]
    src = tmp_path / "in"
    src.mkdir()
    docs = [{"text": t, "url": f"https://site{i}.org/p"} for i, t in enumerate(good[:30])]
    docs.append({"text": good[0], "url": "https://mirror.org/"})                    # exact duplicate
    docs.append({"text": prose(rng), "url": "https://www.spokeo.com/Jane-Doe"})       # blocklisted
    docs.append({"text": "Too short to keep.", "url": None})                           # quality
    docs.append({"txt": "wrong field"})                                                 # missing field
    docs.append({"text": 42})                                                           # not a string
    lines = [json.dumps(d) for d in docs]
    lines.insert(3, "{not json")
    (src / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad utf8\n")
    with gzip.open(src / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": t}) + "\n" for t in good[30:36]))
    (src / "c.txt").write_text(good[36])
    (src / "empty.txt").write_text("")
    (src / "blob.txt").write_bytes(b"\x00\x01\x02binary")  # binary behind a text name
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": good[37:40] + [None]}), src / "d.parquet")

    out = tmp_path / "out"
    assert run("prepare", "--input", src, "--url-field", "url", "--tokenizer", tok, "--out", out,
               "--val-fraction", "0.1") == 0
    assert "total" in capsys.readouterr().out
    m = read_manifest(out)
    t = m["total"]
    assert t["documents_in"] == 31 + 5 + 1 + 6 + 1 + 1 + 1 + 4
    for s in list(m["sources"].values()) + [t]:
        assert s["documents_in"] == s["documents_kept"] + sum(s["dropped"].values())
    assert t["dropped"] == {"binary_file": 1, "blocklisted_domain": 1, "c4_too_few_sentences": 1,
                            "empty_file": 1, "exact_duplicate": 1, "invalid_utf8": 1, "malformed_json": 1,
                            "missing_text_field": 2, "text_not_a_string": 1}
    assert t["documents_kept"] == 40
    assert t["bad_record_locations"]["malformed_json"] == [f"{src / 'a.jsonl'}:4"]
    assert len(m["tokenizer"]["sha256"]) == 64 and m["dtype"] == "uint16"
    assert m["splits"]["val"]["documents"] >= 1 and m["splits"]["train"]["documents"] >= 30

    # Shards read back with numpy decode to exactly the kept documents (independent encode).
    tk = Tokenizer(tok)
    want = sorted(tk.encode(normalize_text(g), bos=True, eos=True) for g in good)
    got = [d.tolist() for sp in ("train", "val") for d in iter_documents(out, sp)]
    assert sorted(got) == want
    raw = np.concatenate([np.fromfile(out / sh["file"], dtype="<u2")
                          for sh in m["splits"]["train"]["shards"]])
    assert np.array_equal(raw, np.concatenate(open_tokens(out, "train")))
    assert t["tokens"] == sum(map(len, want))
    assert run("inspect", out) == 0
    from llama_pretrain.data.loader import TokenLoader
    val = TokenLoader(out, split="val", batch_size=2, seq_len=16)
    assert next(val).shape == (2, 17) and val.vocab_size == tk.vocab_size


def test_strict_and_configuration_errors(tmp_path, tok, capsys):
    rng = random.Random(1)
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": prose(rng)}) + "\n{oops\n")
    assert run("prepare", "--input", f, "--tokenizer", tok, "--out", tmp_path / "o", "--strict") == 2
    err = capsys.readouterr().err
    assert f"{f}:2" in err and "malformed_json" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    # A lax run keeps the good record; a --strict rerun into the same dir must still refuse the file.
    f.write_text("\n".join(json.dumps({"text": prose(rng)}) for _ in range(3)) + "\n{oops\n")
    assert run("prepare", "--input", f, "--tokenizer", tok, "--out", tmp_path / "lax") == 0
    capsys.readouterr()
    assert run("prepare", "--input", f, "--tokenizer", tok, "--out", tmp_path / "lax", "--strict") == 2
    assert "malformed_json" in capsys.readouterr().err
    g = tmp_path / "y.jsonl"
    write_jsonl(g, [{"body": "a", "id": 1}, {"body": "b", "id": 2}])
    assert run("prepare", "--input", g, "--tokenizer", tok, "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "no record has the text field 'text'" in err and "body, id" in err
    assert run("prepare", "--input", tmp_path / "nope*.jsonl", "--tokenizer", tok, "--out", tmp_path / "o3") == 2
    assert "matches no files" in capsys.readouterr().err
    h = tmp_path / "z.jsonl"
    write_jsonl(h, [{"text": "short"}])
    assert run("prepare", "--input", h, "--tokenizer", tok, "--out", tmp_path / "o4") == 2
    assert "no documents left after filtering" in capsys.readouterr().err


# -- near dedup and mixture ----------------------------------------------------------------------------

def test_near_duplicates_removed_and_weights_applied(tmp_path, tok):
    rng = random.Random(2)
    a_docs = [prose(rng, 30) for _ in range(40)]
    near = a_docs[0].split(" ")
    for i in random.Random(3).sample(range(len(near)), max(1, len(near) // 50)):
        near[i] = "river"  # ~2% of the words replaced
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in a_docs] + [{"text": " ".join(near)}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": prose(rng, 12)} for _ in range(200)])
    write_jsonl(tmp_path / "c.jsonl", [{"text": prose(rng, 12)} for _ in range(200)])
    (tmp_path / "mix.toml").write_text(
        'val_fraction = 0.0\n'
        '[[sources]]\nname = "a"\npaths = ["a.jsonl"]\nweight = 1.0\n'
        '[[sources]]\nname = "b"\npaths = ["b.jsonl"]\nweight = 2.0\n'
        '[[sources]]\nname = "c"\npaths = ["c.jsonl"]\nweight = 0.5\n')
    out = tmp_path / "out"
    assert run("prepare", "--config", tmp_path / "mix.toml", "--tokenizer", tok, "--out", out, "--quiet") == 0
    m = read_manifest(out)
    s = m["sources"]
    assert s["a"]["dropped"] == {"near_duplicate": 1} and s["a"]["documents_kept"] == 40
    assert s["b"]["tokens_after_mixing"] == 2 * s["b"]["tokens_before_mixing"]
    assert abs(s["c"]["tokens_after_mixing"] / s["c"]["tokens_before_mixing"] - 0.5) < 0.01
    total = sum(x["tokens_after_mixing"] for x in s.values())
    assert m["splits"]["train"]["tokens"] == total
    assert abs(sum(x["effective_share"] for x in s.values()) - 1) < 1e-4
    assert s["b"]["effective_share"] == pytest.approx(s["b"]["tokens_after_mixing"] / total, abs=1e-6)


# -- PII ----------------------------------------------------------------------------------------------

def test_pii_scrubbed_in_shards_and_counted(tmp_path, tok):
    from llama_pretrain.data.pii import EMAIL_TOKEN, IP_TOKEN, PHONE_TOKEN

    rng = random.Random(6)
    pii = [(f"user{i}@example.com", f"+1 (555) 201-{1000 + i}", f"192.168.{i}.20") for i in range(6)]
    docs = [prose(rng) + f"\n\nWrite to {mail} or call {phone} about it. The server at {ip} was restarted today."
            for mail, phone, ip in pii]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    (tmp_path / "pii.toml").write_text('[stages.pii]\nenabled = true\n[[sources]]\nname = "a"\npaths = ["a.jsonl"]\n')
    out = tmp_path / "out"
    assert run("prepare", "--config", tmp_path / "pii.toml", "--tokenizer", tok, "--out", out, "--quiet") == 0
    m = read_manifest(out)
    assert m["total"]["documents_kept"] == len(docs)
    assert m["sources"]["a"]["pii_replacements"] == m["total"]["pii_replacements"] == {"email": 6, "phone": 6, "ip": 6}
    tk = Tokenizer(tok)
    texts = [tk.decode(d) for sp in ("train", "val") for d in iter_documents(out, sp)]
    assert len(texts) == len(docs)
    for t in texts:
        assert t.count(EMAIL_TOKEN) == t.count(PHONE_TOKEN) == t.count(IP_TOKEN) == 1, t
        assert not any(x in t for row in pii for x in row), t


# -- determinism, resume, tasks ------------------------------------------------------------------------

def _corpus(d: Path, files: int, docs: int, seed: int = 5) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shared = [prose(rng) for _ in range(5)]
    for i in range(files):
        rows = [{"text": prose(rng)} for _ in range(docs)] + [{"text": shared[i % 5]}]  # cross-file dups
        write_jsonl(d / f"part{i:03d}.jsonl", rows)
    return d


def test_a_pool_starts_the_biggest_files_first_and_the_output_is_unchanged(tmp_path, tok, monkeypatch):
    import llama_pretrain.data.prepare as prep
    from llama_pretrain.data.sources import DataConfig, SourceConfig

    src = tmp_path / "in"
    src.mkdir()
    rng = random.Random(3)
    for i, docs in enumerate([3, 40, 3, 12, 40]):  # the big files are not first in path order
        write_jsonl(src / f"part{i}.jsonl", [{"text": prose(rng)} for _ in range(docs)])
    cfg = DataConfig([SourceConfig("web", [str(src)])])
    sizes = {p.name: p.stat().st_size for p in src.iterdir()}
    submitted = []

    class Spy(prep.ProcessPoolExecutor):
        def submit(self, fn, job, *args):
            submitted.append(Path(job["path"]).name)
            return super().submit(fn, job, *args)

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Spy)
    prep.prepare(cfg, tok, tmp_path / "spied", workers=2, progress=False)
    assert sorted(submitted) == sorted(sizes)
    assert [sizes[n] for n in submitted] == sorted(sizes.values(), reverse=True)
    assert submitted[0] in ("part1.jsonl", "part4.jsonl") and submitted[-1] in ("part0.jsonl", "part2.jsonl")
    # The CLI's pool forks its workers (no torch in that process): the same bytes as one worker.
    common = ["--input", src, "--tokenizer", tok, "--quiet"]
    assert run("prepare", *common, "--out", tmp_path / "w1") == 0
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", "data", "prepare", *map(str, common),
                        "--out", str(tmp_path / "w3"), "--workers", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert files_bytes(tmp_path / "w1") == files_bytes(tmp_path / "w3") == files_bytes(tmp_path / "spied")


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks on Linux only")


@linux_only
@pytest.mark.parametrize("before, method", [
    ("", "fork"),
    ("import threading; threading.Thread(target=threading.Event().wait, daemon=True).start()", "spawn"),
    ("import torch", "spawn"),
    # our progress bars start no tqdm monitor thread, shown or not
    ("from llama_pretrain.data.pool import progress_bar as bar; bar(True, total=2).close(); bar(False).close()",
     "fork"),
])
def test_the_pool_forks_only_where_it_is_safe(before, method):
    # fork: workers start at once and need no __main__ guard; spawn when another thread is alive
    # (it could hold a lock the child then waits on) or torch's thread pools are loaded.
    code = f"{before}\nfrom llama_pretrain.data.pool import pool_context\nprint(pool_context().get_start_method())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [method]


@linux_only
def test_a_script_without_a_main_guard_prepares_with_workers(tmp_path, tok):
    # Spawned workers would re-run such a script; forked ones do not, for a second pool too.
    src = _corpus(tmp_path / "in", 3, 10)
    script = tmp_path / "prep.py"
    script.write_text(
        "from llama_pretrain.data.prepare import prepare\n"
        "from llama_pretrain.data.sources import DataConfig, SourceConfig\n"
        f"for out in ('out', 'again'):\n"
        f"    m = prepare(DataConfig([SourceConfig('web', [{str(src)!r}])]), {str(tok)!r},"
        f" {str(tmp_path)!r} + '/' + out, workers=2, progress=False)\n"
        "    print('kept', m['total']['documents_kept'])\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("kept") == 2 and int(r.stdout.split()[-1]) > 0
    assert run("prepare", "--input", src, "--tokenizer", tok, "--quiet", "--out", tmp_path / "w1") == 0
    assert files_bytes(tmp_path / "out") == files_bytes(tmp_path / "again") == files_bytes(tmp_path / "w1")


def test_workers_tasks_and_merge_are_byte_identical(tmp_path, tok):
    src = _corpus(tmp_path / "in", 6, 15)
    common = ["--input", src, "--tokenizer", tok, "--quiet", "--val-fraction", "0.05"]
    assert run("prepare", *common, "--out", tmp_path / "w1") == 0
    assert run("prepare", *common, "--out", tmp_path / "w2", "--workers", "2") == 0
    ref = files_bytes(tmp_path / "w1")
    assert ref == files_bytes(tmp_path / "w2")
    m1, m2 = (json.loads((tmp_path / w / "manifest.json").read_text()) for w in ("w1", "w2"))
    assert m1 == m2
    for i in range(3):
        assert run("prepare", *common, "--out", tmp_path / f"t{i}", "--num-tasks", "3", "--task-index", i) == 0
    assert run("merge", *(tmp_path / f"t{i}" for i in range(3)), "--out", tmp_path / "merged", "--quiet") == 0
    assert files_bytes(tmp_path / "merged") == ref
    mm = read_manifest(tmp_path / "merged")
    assert mm["total"] == m1["total"] and mm["sources"] == m1["sources"]
    assert m1["total"]["dropped"]["exact_duplicate"] == 1  # the shared docs repeat across task parts
    assert run("merge", tmp_path / "t0", tmp_path / "t1", "--out", tmp_path / "bad", "--quiet") == 2


def test_bad_config_values_and_out_paths_are_user_errors(tmp_path, tok, capsys):
    f = tmp_path / "x.jsonl"
    write_jsonl(f, [{"text": prose(random.Random(4))}])
    cases = {'weight = "heavy"': "weight must be a number", 'quality = "no"': "quality must be true or false",
             "text_field = 3": "text_field must be a string", 'TOP seed = "x"': "seed must be an integer",
             "TOP shard_tokens = [1]": "shard_tokens must be an integer", "TOP seed = 1.5": "seed must be an integer"}
    for i, (line, want) in enumerate(cases.items()):
        top, src = (line[4:], "") if line.startswith("TOP ") else ("", line)
        c = tmp_path / f"c{i}.toml"
        c.write_text(f'{top}\n[[sources]]\nname = "a"\npaths = ["{f}"]\n{src}\n')
        assert run("prepare", "--config", c, "--tokenizer", tok, "--out", tmp_path / f"o{i}") == 2, line
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, (line, err)
    assert run("prepare", "--input", f, "--tokenizer", tok, "--out", tmp_path / "o", "--num-tasks", "0") == 2
    assert "--num-tasks must be >= 1" in capsys.readouterr().err
    assert run("merge", tmp_path / "t0", "--out", f) == 2  # --out is a file: refused before any work
    assert "exists and is not a directory" in capsys.readouterr().err


# Run in the killed subprocess: ``data prepare`` whose reader stalls in the middle of the 4th input
# file (after signalling), so the kill always lands mid-run with 3 units done and one half-written.
_STALL_IN_UNIT_3 = """
import sys, time
from pathlib import Path
import llama_pretrain.data.prepare as p
from llama_pretrain.cli import main
real = p.iter_records
def stalling(path, *args):
    for i, rec in enumerate(real(path, *args)):
        if path.name == "part003.jsonl" and i == 5:
            Path(sys.argv[1]).touch()
            time.sleep(600)
        yield rec
p.iter_records = stalling
sys.exit(main(["data", "prepare", *sys.argv[2:]]))
"""


def test_kill_and_rerun_resumes_to_identical_output(tmp_path, tok):
    n_files = 8
    src = _corpus(tmp_path / "in", n_files, 10, seed=9)
    args = ["--input", str(src), "--tokenizer", str(tok), "--quiet"]
    assert run("prepare", *args, "--out", tmp_path / "clean") == 0
    out, stalled = tmp_path / "killed", tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _STALL_IN_UNIT_3, str(stalled), *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not stalled.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    units = out / "_work" / "units" / "input"
    done_before = len(list(units.glob("0*")))
    assert 0 < done_before == 3 < n_files  # killed mid-way
    assert list(units.glob(".000003.tmp-*")) and not (out / "manifest.json").exists()
    for u in units.glob("0*"):  # what exists under a final name is complete
        assert (u / "stats.json").is_file()
    from llama_pretrain.data.prepare import prepare
    from llama_pretrain.data.sources import DataConfig, SourceConfig
    m = prepare(DataConfig([SourceConfig("input", [str(src)])]), tok, out, progress=False)
    assert m["_reused_units"] == done_before
    assert files_bytes(out) == files_bytes(tmp_path / "clean")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()


# Run in the interrupted subprocess: ``data prepare`` whose units each take ~0.5 s (forked workers
# inherit the slow reader).
_SLOW_UNITS = """
import sys, time
import llama_pretrain.data.prepare as p
from llama_pretrain.cli import main
real = p.iter_records
def slow(path, *args):
    for rec in real(path, *args):
        time.sleep(0.05)
        yield rec
p.iter_records = slow
sys.exit(main(["data", "prepare", *sys.argv[1:]]))
"""


@linux_only
def test_ctrl_c_stops_every_worker_without_finishing_queued_files(tmp_path, tok):
    # Ctrl-C signals the whole process group: the workers drop their files in progress and skip
    # the ones already queued to them, instead of finishing those first.
    src = _corpus(tmp_path / "in", 12, 9, seed=4)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_UNITS, "--input", str(src), "--tokenizer", str(tok),
                             "--out", str(out), "--workers", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    units = out / "_work" / "units" / "input"
    deadline = time.time() + 60
    while not list(units.glob("0*/stats.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    done_at_signal = len(list(units.glob("0*/stats.json")))
    assert proc.poll() is None and done_at_signal >= 1
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["llama-pretrain data: interrupted"], err
    done = len(list(units.glob("0*/stats.json")))
    assert done - done_at_signal <= 1 and done < 12  # at most one finishing as the signal came
    assert not list(units.glob(".*tmp-*")) and not (out / "manifest.json").exists()


# -- built-in corpus -----------------------------------------------------------------------------------

def test_builtin_corpus(tmp_path, tok):
    from llama_pretrain.data.builtin import write_builtin_corpus
    from llama_pretrain.data.sources import load_data_config

    cfg_path = write_builtin_corpus(tmp_path / "b", max_docs=20)
    cfg = load_data_config(cfg_path)
    assert [(s.name, s.weight) for s in cfg.sources] == [("stdlib_code", 1.0), ("stdlib_docs", 2.0)]
    code = [json.loads(x) for x in (tmp_path / "b" / "stdlib_code.jsonl").read_text().splitlines()]
    docs = [json.loads(x) for x in (tmp_path / "b" / "stdlib_docs.jsonl").read_text().splitlines()]
    assert len(code) == 20 and len(docs) == 20
    assert any("def " in c["text"] for c in code) and all(len(d["text"]) >= 200 for d in docs)
    assert run("prepare", "--config", cfg_path, "--tokenizer", tok, "--out", tmp_path / "o", "--quiet") == 0
    s = read_manifest(tmp_path / "o")["sources"]
    assert s["stdlib_docs"]["tokens_after_mixing"] == 2 * s["stdlib_docs"]["tokens_before_mixing"]
    assert s["stdlib_code"]["documents_kept"] >= 18


# -- a full disk ------------------------------------------------------------------------------------
def test_prepare_onto_a_full_disk_is_one_line_and_keeps_the_previous_dataset(tmp_path, tok, small_disk,
                                                                              capsys, monkeypatch):
    import shutil

    import llama_pretrain.data.phase2.run as run_stage
    import llama_pretrain.data.prepare as prep

    common = ["--tokenizer", tok, "--quiet", "--val-fraction", "0.1"]
    out = small_disk / "data"
    assert run("prepare", "--input", _corpus(tmp_path / "a", 2, 10), "--out", out, *common) == 0
    before = files_bytes(out), (out / "manifest.json").read_bytes()
    import llama_pretrain.data.phase2.write as write_stage

    real_write = write_stage.run_write

    def disk_fills_up(*args):  # another program fills the disk while shards are written
        (small_disk / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 1024))
        return real_write(*args)

    monkeypatch.setattr(run_stage, "run_write", disk_fills_up)
    capsys.readouterr()
    assert run("prepare", "--input", _corpus(tmp_path / "b", 3, 20, seed=9), "--out", out, *common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"no space left to write {out}: " in err, err
    assert "bytes are free in" in err
    assert (files_bytes(out), (out / "manifest.json").read_bytes()) == before
    assert not [p for p in small_disk.rglob("*") if ".tmp-" in p.name or p.name == prep.STAGING]


# -- what a directory holds -----------------------------------------------------------------------
def test_a_directory_input_reads_only_files_of_a_known_format(tmp_path, tok):
    src = _corpus(tmp_path / "in", 2, 10)
    (src / "data.toml").write_text('[[sources]]\nname = "a"\npaths = ["part000.jsonl"]\n' * 20)
    (src / "prepare.sh").write_text("llama-pretrain data prepare --input . --out out\n" * 40)
    out = tmp_path / "out"
    assert run("prepare", "--input", src, "--tokenizer", tok, "--out", out, "--quiet", "--no-quality") == 0
    m = read_manifest(out)
    assert m["total"]["documents_in"] == 2 * 11  # the JSONL records only, not the config or the script
    assert "bad_record_locations" not in m["total"] or not any(
        "data.toml" in loc or "prepare.sh" in loc for locs in m["total"]["bad_record_locations"].values()
        for loc in locs)


def test_a_directory_without_known_files_names_the_formats_and_the_glob(tmp_path, tok, capsys):
    src = tmp_path / "code"
    src.mkdir()
    (src / "a.py").write_text("print('hello')\n")
    assert run("prepare", "--input", src, "--tokenizer", tok, "--out", tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ".jsonl" in err and f"{src}/**/*.py" in err, err
