"""Phase 2 as stages of tasks (data/phase2/): the same decisions as the in-memory rule, the same
bytes for any number of tasks or hash ranges, a failed task re-run alone, the Slurm recipe."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama_pretrain.cli import main
from llama_pretrain.data.dedup import NearDedup
from llama_pretrain.data.drops import Stats
from llama_pretrain.data.shards import read_manifest
from llama_pretrain.data.sources import DataConfig, NearDedupStage, SourceConfig, Stages
from llama_pretrain.errors import UserError

from helpers.synthetic_text import prose, prose_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return prose_tokenizer(tmp_path_factory.mktemp("tok"))


def dataset(d: Path) -> dict[str, bytes]:
    """Every file a reader sees (shards and manifest), not the work files."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "_work" not in p.parts}


# -- decisions: the in-memory rule, on signatures made to collide -----------------------------------

def _fake_units(root: Path, rng: np.random.Generator, units: int, per_unit: int, perm: int) -> list:
    """Phase-1 work files with few distinct exact hashes and band values, so that exact
    duplicates, band collisions and chains of near duplicates (A~B, B~C, not A~C) are common."""
    from llama_pretrain.data.phase2.context import UnitInfo

    infos = []
    for k in range(units):
        d = root / f"u{k}"
        d.mkdir(parents=True)
        n = int(rng.integers(0, per_unit + 1))
        (d / "lengths.bin").write_bytes(rng.integers(2, 9, n).astype("<u4").tobytes())
        (d / "hashes.bin").write_bytes(rng.integers(0, 3 * units * per_unit // 4 + 1, n).astype("<u8").tobytes())
        (d / "minhash.bin").write_bytes(rng.integers(0, 6, (n, perm)).astype("<u4").tobytes())
        infos.append(UnitInfo(d, 0, Stats(documents_in=n, documents_kept=n, files=1), f"fp{k}"))
    return infos


def _reference_drops(infos: list, bands: int, rows: int) -> dict[tuple[int, int], str]:
    """The in-memory rule: in global order, exact first (every earlier key), then LSH against kept."""
    seen: set[int] = set()
    lsh = NearDedup(bands, rows)
    out = {}
    for k, u in enumerate(infos):
        hashes = np.fromfile(u.dir / "hashes.bin", dtype="<u8")
        sigs = np.fromfile(u.dir / "minhash.bin", dtype="<u4").reshape(len(hashes), -1)
        for i, h in enumerate(hashes.tolist()):
            if h in seen:
                out[(k, i)] = "exact_duplicate"
                continue
            seen.add(h)
            if lsh.is_duplicate(sigs[i]):
                out[(k, i)] = "near_duplicate"
    return out


@pytest.mark.parametrize("range_docs", [1, 5, 1 << 20])
def test_dedup_stages_decide_as_the_in_memory_rule(tmp_path, range_docs):
    from llama_pretrain.data.phase2.context import Phase2
    from llama_pretrain.data.phase2.dedup import REASONS, run_dedup, run_keys, run_resolve, unit_drops

    bands, rows = 3, 2
    rng = np.random.default_rng(range_docs)
    infos = _fake_units(tmp_path / "units", rng, units=7, per_unit=40, perm=bands * rows)
    cfg = DataConfig([SourceConfig("s", ["unused"])],
                     stages=Stages(near_dedup=NearDedupStage(bands=bands, rows=rows)))
    ctx = Phase2(cfg, infos, tmp_path / "out", {"sha256": "x", "vocab_size": 100}, docs_per_range=range_docs)
    assert ctx.partitions == ctx.ranges * (1 + bands) and (ctx.ranges > 1) == (range_docs < 100)
    for k in range(len(infos)):
        run_keys(ctx, k)
    for p in range(ctx.partitions):
        run_dedup(ctx, p)
    run_resolve(ctx)
    got = {}
    for k in range(len(infos)):
        idx, reasons = unit_drops(ctx, k)
        got.update({(k, int(i)): REASONS[int(r)] for i, r in zip(idx, reasons)})
    want = _reference_drops(infos, bands, rows)
    assert got == want
    kinds = list(want.values())
    assert kinds.count("exact_duplicate") > 10 and kinds.count("near_duplicate") > 10


# -- end to end: tasks, parts, ranges -----------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three sources of three files; exact and near duplicates across files (so across tasks), one
    source up-sampled 1.5x and one down-sampled."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(5)
    originals = [prose(rng, rng.randint(6, 10)) for _ in range(40)]

    def near(t: str) -> str:
        w = t.split()
        w[len(w) // 2] += "s"
        return " ".join(w)

    srcs = []
    for name, weight in (("web", 1.0), ("books", 1.5), ("code", 0.4)):
        for f in range(3):
            docs = [prose(rng, rng.randint(3, 9)) for _ in range(25)]
            docs += [rng.choice(originals) for _ in range(4)] + [near(rng.choice(originals)) for _ in range(4)]
            rng.shuffle(docs)
            p = root / name / f"part{f}.jsonl"
            p.parent.mkdir(exist_ok=True)
            p.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        srcs.append(f'[[sources]]\nname = "{name}"\npaths = ["{root / name}"]\nweight = {weight}\nquality = false\n')
    (root / "data.toml").write_text("val_fraction = 0.05\nshard_tokens = 4000\n" + "".join(srcs))
    return root / "data.toml"


def prepare(cfg: Path, tok: Path, out: Path, *extra) -> int:
    return main(["data", "prepare", "--config", str(cfg), "--tokenizer", str(tok), "--out", str(out), "--quiet",
                 *map(str, extra)])


@pytest.fixture(scope="module")
def one_process(corpus, tok, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("one") / "out"
    assert prepare(corpus, tok, out) == 0
    m = read_manifest(out)["total"]["dropped"]
    assert m.get("exact_duplicate", 0) >= 10 and m.get("near_duplicate", 0) >= 5, m
    return dataset(out)


def run_stages(corpus: Path, tok: Path, out: Path, tasks: int, *extra) -> None:
    for stage in ("units", "keys", "dedup", "resolve", "split", "plan", "write", "finish"):
        for i in range(tasks):
            assert prepare(corpus, tok, out, "--stage", stage, "--num-tasks", tasks, "--task-index", i, *extra) == 0


@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_stage_tasks_write_what_one_process_writes(corpus, tok, one_process, tmp_path, tasks):
    out = tmp_path / "out"
    run_stages(corpus, tok, out, tasks, "--range-docs", 16)
    assert dataset(out) == one_process
    left = [p.relative_to(out / "_work") for p in (out / "_work" / "phase2").rglob("*") if p.is_file()]
    assert [p.parts[2:] for p in left] == [("done", "finish", "00000000")]  # phase 2's work files are gone
    assert prepare(corpus, tok, out, "--stage", "finish", "--range-docs", 16) == 0  # a late task: no work
    assert dataset(out) == one_process


@pytest.mark.parametrize("tasks", [2, 3])
def test_parts_merged_equal_one_process(corpus, tok, one_process, tmp_path, tasks):
    parts = [tmp_path / f"part{i}" for i in range(tasks)]
    for i, p in enumerate(parts):
        assert prepare(corpus, tok, p, "--num-tasks", tasks, "--task-index", i) == 0
    out = tmp_path / "merged"
    assert main(["data", "merge", *map(str, parts), "--out", str(out), "--quiet", "--workers", "2"]) == 0
    got = dataset(out)
    manifest = json.loads(got.pop("manifest.json"))
    want = dict(one_process)
    assert json.loads(want.pop("manifest.json"))["sources"] == manifest["sources"]
    assert got == want


def test_pool_workers_and_hash_ranges_do_not_change_the_bytes(corpus, tok, one_process, tmp_path):
    out = tmp_path / "out"
    assert prepare(corpus, tok, out, "--workers", 2, "--range-docs", 20) == 0
    assert dataset(out) == one_process


# -- failures: a stage's order, a failed task re-run alone ----------------------------------------------

def test_a_failed_task_is_rerun_alone_and_the_bytes_are_the_same(corpus, tok, one_process, tmp_path, monkeypatch,
                                                                 capsys):
    import llama_pretrain.data.phase2.run as run_stage

    out = tmp_path / "out"
    for stage in ("units", "keys"):
        for i in range(2):
            assert prepare(corpus, tok, out, "--stage", stage, "--num-tasks", 2, "--task-index", i) == 0
    capsys.readouterr()
    assert prepare(corpus, tok, out, "--stage", "resolve", "--num-tasks", 2, "--task-index", 0) == 2
    assert "stage dedup is not finished" in capsys.readouterr().err
    real = {"dedup": run_stage.run_dedup, "write": run_stage.run_write}
    calls = {"n": 0}

    def dies_on_second_item(stage):
        def item(*args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # the node goes away mid-task
            return real[stage](*args)
        return item

    for stage in ("dedup", "resolve", "split", "plan", "write", "finish"):
        if stage in real:
            calls["n"] = 0
            monkeypatch.setattr(run_stage, f"run_{stage}", dies_on_second_item(stage))
            assert prepare(corpus, tok, out, "--stage", stage, "--num-tasks", 2, "--task-index", 1) == 130
            monkeypatch.setattr(run_stage, f"run_{stage}", real[stage])
            done = {p.name for p in (next((out / "_work" / "phase2").iterdir()) / "done" / stage).iterdir()}
            assert len(done) == 1  # the first item of task 1 stays done, the rest is redone
        for i in range(2):
            assert prepare(corpus, tok, out, "--stage", stage, "--num-tasks", 2, "--task-index", i) == 0
    assert dataset(out) == one_process
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_a_file_of_someone_else_in_the_work_dir_is_not_removed(corpus, tok, tmp_path, capsys):
    out = tmp_path / "out"
    for stage in ("units", "keys"):
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    work = next((out / "_work" / "phase2").iterdir())
    (work / "keys" / "notes.txt").write_text("mine\n")
    for stage in ("dedup", "resolve", "split", "plan", "write"):  # they write only their own names
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    capsys.readouterr()
    assert prepare(corpus, tok, out, "--stage", "finish") == 2  # it would remove the work dir
    assert "notes.txt" in capsys.readouterr().err
    assert (work / "keys" / "notes.txt").read_text() == "mine\n" and not (out / "manifest.json").exists()
    (work / "keys" / "notes.txt").unlink()
    assert prepare(corpus, tok, out, "--stage", "finish") == 0
    assert read_manifest(out)["splits"]["train"]["tokens"] > 0


def test_the_cli_offers_every_stage_in_order():
    from llama_pretrain.commands.data import STAGES as CLI_STAGES
    from llama_pretrain.data.phase2.run import STAGES

    assert CLI_STAGES == ("units", *STAGES)


def test_an_unknown_range_setting_is_one_line(corpus, tok, tmp_path, capsys):
    assert prepare(corpus, tok, tmp_path / "o", "--range-docs", 0) == 2
    assert "--range-docs must be >= 1" in capsys.readouterr().err
    with pytest.raises(UserError):
        from llama_pretrain.data.prepare import prepare_stage
        from llama_pretrain.data.sources import load_data_config

        prepare_stage(load_data_config(corpus), tok, tmp_path / "o2", "sort", progress=False)


# -- the Slurm recipe, run as its job arrays' tasks would run ------------------------------------------

def test_slurm_recipe_in_local_mode_writes_what_one_process_writes(corpus, tok, one_process, tmp_path):
    env = {**os.environ, "LOCAL": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "submit.sh"), str(corpus), str(tok), str(out), "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "stage finish: 1 task(s) done" in r.stdout
    assert dataset(out) == one_process


def test_near_groups_of_bands_past_255_are_not_mixed_up(tmp_path):
    """A group is (its first document, its band): band 256 of document 0 is not band 0 of document 1."""
    from llama_pretrain.data.phase2.context import Phase2, UnitInfo
    from llama_pretrain.data.phase2.dedup import REASONS, run_dedup, run_keys, run_resolve, unit_drops

    bands, rows, n = 257, 1, 4
    d = tmp_path / "u0"
    d.mkdir()
    sigs = np.arange(n * bands, dtype="<u4").reshape(n, bands) + 100  # no band shared ...
    sigs[2, 256] = sigs[0, 256]  # ... but document 2 ~ document 0 (band 256)
    sigs[3, 0] = sigs[1, 0]      # and document 3 ~ document 1 (band 0)
    sigs.tofile(d / "minhash.bin")
    np.arange(n, dtype="<u8").tofile(d / "hashes.bin")
    np.full(n, 5, dtype="<u4").tofile(d / "lengths.bin")
    infos = [UnitInfo(d, 0, Stats(documents_in=n, documents_kept=n, files=1), "fp")]
    cfg = DataConfig([SourceConfig("s", ["unused"])], stages=Stages(near_dedup=NearDedupStage(bands=bands, rows=rows)))
    ctx = Phase2(cfg, infos, tmp_path / "out", {"sha256": "x", "vocab_size": 100})
    run_keys(ctx, 0)
    for p in range(ctx.partitions):
        run_dedup(ctx, p)
    run_resolve(ctx)
    idx, reasons = unit_drops(ctx, 0)
    got = {(0, int(i)): REASONS[int(r)] for i, r in zip(idx, reasons)}
    assert got == _reference_drops(infos, bands, rows) == {(0, 2): "near_duplicate", (0, 3): "near_duplicate"}


def test_a_local_run_stopped_while_writing_shards_resumes_with_every_shard(corpus, tok, one_process, tmp_path,
                                                                         monkeypatch):
    """The shards written before Ctrl-C stay in staging for the items marked done."""
    import llama_pretrain.data.phase2.run as run_stage

    real, calls = run_stage.run_write, {"n": 0}

    def dies_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    out = tmp_path / "out"
    monkeypatch.setattr(run_stage, "run_write", dies_on_third)
    assert prepare(corpus, tok, out) == 130
    monkeypatch.setattr(run_stage, "run_write", real)
    assert prepare(corpus, tok, out) == 0
    assert dataset(out) == one_process


@pytest.mark.parametrize("when", ["after the swap", "removing the work files"])
def test_a_finish_stopped_late_is_finished_by_a_rerun(corpus, tok, one_process, tmp_path, monkeypatch, when):
    import shutil

    import llama_pretrain.data.outdir as outdir

    out = tmp_path / "out"
    if when == "after the swap":
        real_swap = outdir.swap_in

        def swap_then_die(*args):
            real_swap(*args)
            raise KeyboardInterrupt
        monkeypatch.setattr(outdir, "swap_in", swap_then_die)
    else:
        real_rmtree = shutil.rmtree

        def rmtree_half(path, *args, **kw):  # the write stage's files go, then the process dies
            if "phase2" in Path(path).parts or Path(path).name == "phase2":
                work = next((out / "_work" / "phase2").iterdir())
                real_rmtree(work / "write", ignore_errors=True)
                raise KeyboardInterrupt
            return real_rmtree(path, *args, **kw)
        monkeypatch.setattr(shutil, "rmtree", rmtree_half)
    for stage in ("units", "keys", "dedup", "resolve", "split", "plan", "write"):
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    assert prepare(corpus, tok, out, "--stage", "finish") == 130
    monkeypatch.undo()
    assert prepare(corpus, tok, out, "--stage", "finish") == 0
    assert dataset(out) == one_process
    assert prepare(corpus, tok, out) == 0  # and a local run over it
    assert dataset(out) == one_process


def test_what_a_killed_write_left_in_staging_is_not_swapped_in(corpus, tok, one_process, tmp_path):
    out = tmp_path / "out"
    for stage in ("units", "keys", "dedup", "resolve", "split", "plan", "write"):
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    (out / ".staging" / "train" / ".00000.bin.tmp-k1ll3d").write_bytes(b"\0" * 10)  # as kill -9 leaves them
    (out / ".staging" / ".manifest.json.tmp-k1ll3d").write_text("{")
    assert prepare(corpus, tok, out, "--stage", "finish") == 0
    assert dataset(out) == one_process
    assert prepare(corpus, tok, out) == 0  # a run over it is not refused


def test_a_swap_stopped_midway_is_completed_by_a_rerun(corpus, tok, one_process, tmp_path, monkeypatch):
    """Killed after train/ was swapped in but before val/ was (no manifest in OUT then): the
    re-run is not refused for the shards there, and finishes the swap."""
    import llama_pretrain.data.prepare as prep

    out = tmp_path / "out"
    assert prepare(corpus, tok, out, "--val-fraction", 0.2) == 0  # an earlier dataset in OUT
    for stage in ("units", "keys", "dedup", "resolve", "split", "plan", "write"):
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    real_rename, moved = os.rename, []

    def killed_after_the_first_split(src, dst):
        if prep.STAGING in str(src) and moved:
            raise KeyboardInterrupt
        moved.append(src)
        return real_rename(src, dst)

    monkeypatch.setattr(prep.os, "rename", killed_after_the_first_split)
    assert prepare(corpus, tok, out, "--stage", "finish") == 130
    monkeypatch.setattr(prep.os, "rename", real_rename)
    assert not (out / "manifest.json").exists() and any((out / "train").iterdir())
    assert prepare(corpus, tok, out, "--stage", "finish") == 0
    assert dataset(out) == one_process


def test_a_second_run_into_the_same_dir_is_refused_in_one_line(corpus, tok, tmp_path, capsys):
    """A whole run holds OUT's lock exclusively; the tasks of one stage share it."""
    from llama_pretrain.data.prepare import out_lock

    out = tmp_path / "out"
    with out_lock(out, "test", shared=True):  # a stage task of a job array is writing
        assert prepare(corpus, tok, out, "--stage", "units") == 0  # another task: shared
        capsys.readouterr()
        assert prepare(corpus, tok, out) == 2
        err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is being written by another data prepare" in err, err
    assert not (out / "manifest.json").exists()
    assert prepare(corpus, tok, out) == 0  # once it is free


def test_a_stage_run_with_other_settings_than_the_earlier_ones_says_so(corpus, tok, tmp_path, capsys):
    out = tmp_path / "out"
    for stage in ("units", "keys"):
        assert prepare(corpus, tok, out, "--stage", stage) == 0
    capsys.readouterr()
    assert prepare(corpus, tok, out, "--stage", "dedup", "--range-docs", 5) == 2
    err = capsys.readouterr().err
    assert "no phase-2 work" in err and "--range-docs differ" in err
    assert prepare(corpus, tok, out, "--stage", "dedup") == 0


def test_ctrl_c_during_the_swap_waits_for_it(corpus, tok, one_process, tmp_path):
    """A Ctrl-C that comes while the new splits are renamed in ends the run after the swap, with
    the new dataset whole (not half of each). In a process of its own: signals go to the main
    thread, which a test may not run on."""
    out = tmp_path / "out"
    assert prepare(corpus, tok, out, "--val-fraction", 0.2) == 0  # an earlier dataset in OUT
    script = f"""
import os, signal, sys
from llama_pretrain.cli import main
real_rename = os.rename
def ctrl_c_while_renaming(src, dst):
    if ".staging" in str(src):
        os.kill(os.getpid(), signal.SIGINT)
    return real_rename(src, dst)
os.rename = ctrl_c_while_renaming
sys.exit(main(["data", "prepare", "--config", {str(corpus)!r}, "--tokenizer", {str(tok)!r},
               "--out", {str(out)!r}, "--quiet"]))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 130, r.stderr
    assert dataset(out) == one_process and not (out / ".staging").exists()
