"""--out attacks: a command replaces only its own earlier output. A directory holding anything else
(a user's files, a symlink), `/`, `.`, the home directory, a dangling symlink or a regular file is
refused in one line, exit 2, before any work, and nothing in it is removed or left behind."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from llama_pretrain.cli import main
from llama_pretrain.config import ModelConfig
from llama_pretrain.interop import save_native
from llama_pretrain.model import Transformer

from helpers.synthetic_text import prose, prose_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = ModelConfig.from_preset("llama2-debug", dim=64)
    return save_native(Transformer(cfg).state_dict(), cfg, tmp_path_factory.mktemp("src") / "ckpt")


@pytest.fixture(scope="module")
def hf(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hfsrc") / "hf"
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return prose_tokenizer(tmp_path_factory.mktemp("tok"))


def snapshot(d: Path) -> dict[str, bytes | str]:
    """Every entry under ``d``: a file's bytes, a symlink's target, a directory as "dir"."""
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        key = str(p.relative_to(d))
        out[key] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes())
    return out


def leftovers(d: Path) -> list[str]:
    return [str(p) for p in d.rglob(".*") if ".old-" in p.name or ".tmp-" in p.name or p.name == ".staging"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def user_dir(d: Path) -> Path:
    (d / "notes").mkdir(parents=True)
    (d / "README.md").write_text("my project\n")
    (d / "notes" / "todo.txt").write_text("buy milk\n")
    (d / "config.json").write_text('{"mine": true}\n')
    return d


def convert(kind: str, ckpt: Path, hf: Path, out: Path, *extra: str) -> int:
    src = ckpt if kind == "export-hf" else hf
    return main([kind, str(src), "--out", str(out), *extra])


# -- import-hf / export-hf --force -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["export-hf", "import-hf"])
@pytest.mark.parametrize("force", [True, False])
def test_user_files_in_out_survive_force_and_are_named(kind, force, ckpt, hf, tmp_path, capsys):
    out = user_dir(tmp_path / "project")
    before = snapshot(tmp_path)
    assert convert(kind, ckpt, hf, out, *(["--force"] if force else [])) == 2
    err = one_line_error(capsys)
    assert "README.md" in err and str(out) in err
    assert snapshot(tmp_path) == before  # nothing removed, nothing written, no temporary left
    assert convert(kind, ckpt, hf, tmp_path / "clean") == 0  # a rerun with a clean --out works
    assert (tmp_path / "clean" / "model.safetensors").is_file() and not leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["export-hf", "import-hf"])
def test_own_earlier_output_is_replaced_with_force_but_not_a_file_added_to_it(kind, ckpt, hf, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(kind, ckpt, hf, out) == 0
    first = snapshot(out)
    (out / "model.safetensors").write_bytes(b"stale")  # to see it replaced
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert convert(kind, ckpt, hf, out, "--force") == 2
    assert "notes.txt" in one_line_error(capsys) and snapshot(tmp_path) == before
    (out / "notes.txt").unlink()  # now it is exactly our earlier output
    assert convert(kind, ckpt, hf, out) == 2
    assert "pass --force" in one_line_error(capsys)
    assert convert(kind, ckpt, hf, out, "--force") == 0
    assert snapshot(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_checkpoint_is_not_hf_output_so_export_hf_force_leaves_it(ckpt, tmp_path, capsys):
    # --out is the source checkpoint itself (or any native checkpoint): not what export-hf writes
    mine = tmp_path / "mine"
    shutil.copytree(ckpt, mine)
    before = snapshot(tmp_path)
    assert main(["export-hf", str(mine), "--out", str(mine), "--force"]) == 2
    assert "config.json" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


def test_a_failed_replace_puts_the_previous_output_back(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 0
    before = snapshot(tmp_path)
    real_rename = os.rename

    def failing(src, dst, *a, **kw):  # the new output cannot be moved into place
        if ".tmp-" in Path(src).name and Path(dst) == out:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        main(["export-hf", str(ckpt), "--out", str(out), "--force", "--dtype", "bf16"])
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


# -- paths that are never an output directory ---------------------------------------------------

def _bad_out(tmp_path: Path, which: str, monkeypatch) -> tuple[str, Path]:
    """The --out value and the directory that must not change."""
    if which == "root":
        return "/", tmp_path
    if which == "dangling":
        (tmp_path / "link").symlink_to(tmp_path / "target")
        return str(tmp_path / "link"), tmp_path
    if which == "file":
        (tmp_path / "model.bin").write_bytes(b"user data")
        return str(tmp_path / "model.bin"), tmp_path
    if which == "home":
        home = user_dir(tmp_path / "home")
        monkeypatch.setenv("HOME", str(home))
        return "~", tmp_path
    if which in ("cwd", "empty-cwd"):
        cwd = tmp_path / "cwd"
        user_dir(cwd) if which == "cwd" else cwd.mkdir()
        monkeypatch.chdir(cwd)
        return ".", tmp_path
    if which == "symlinked-dir":
        real = user_dir(tmp_path / "real")
        (tmp_path / "link").symlink_to(real)
        return str(tmp_path / "link"), tmp_path
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["root", "dangling", "file", "home", "cwd", "empty-cwd", "symlinked-dir"])
@pytest.mark.parametrize("kind", ["export-hf", "import-hf"])
def test_paths_that_are_no_output_dir_are_one_line_exit_2(kind, which, ckpt, hf, tmp_path, monkeypatch, capsys):
    out, keep = _bad_out(tmp_path, which, monkeypatch)
    if out == "~":
        out = os.path.expanduser(out)  # as the shell would
    before, root_before = snapshot(keep), sorted(os.listdir("/"))
    assert convert(kind, ckpt, hf, Path(out), "--force") == 2
    one_line_error(capsys)
    assert snapshot(keep) == before and sorted(os.listdir("/")) == root_before
    assert not (tmp_path / "target").exists()


# -- data prepare / data merge ----------------------------------------------------------------------

def corpus(d: Path, files: int = 1, seed: int = 1) -> Path:
    """``files`` JSONL files of 12 documents each."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(files):
        (d / f"{i}.jsonl").write_text("".join(json.dumps({"text": prose(rng)}) + "\n" for _ in range(12)))
    return d


def prepare(src: Path, tok: Path, out: Path | str, *extra: str) -> int:
    return main(["data", "prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out),
                 "--quiet", "--no-quality", "--val-fraction", "0.2", *extra])


@pytest.mark.parametrize("foreign", ["train/my_script.py", "val/notes.txt", "README.md", "train/00099.bin",
                                     "_work/units/input/000000/notes.txt", "manifest.json"])
@pytest.mark.parametrize("earlier", [False, True])
def test_data_prepare_never_removes_a_user_file(foreign, earlier, tok, tmp_path, capsys):
    out = tmp_path / "out"
    if earlier or foreign.startswith("_work"):  # out holds an earlier dataset too
        assert prepare(corpus(tmp_path / "old", seed=2), tok, out) == 0
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("# mine\n")
    src = corpus(tmp_path / "in")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert prepare(src, tok, out) == 2
    assert foreign in one_line_error(capsys)
    assert snapshot(tmp_path) == before
    (out / foreign).unlink()  # moved away: the rerun works and replaces the earlier dataset
    if foreign == "manifest.json" and earlier:  # without their manifest, shards are not ours to remove
        capsys.readouterr()
        assert prepare(src, tok, out) == 2 and "train/00000.bin" in one_line_error(capsys)
        shutil.rmtree(out / "train")
        shutil.rmtree(out / "val")
    assert prepare(src, tok, out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["total"]["documents_in"] == 12 and not leftovers(tmp_path)


def test_data_prepare_refuses_a_symlinked_train_in_one_line(tok, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.py").write_text("print('mine')\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train").symlink_to(theirs)
    src = corpus(tmp_path / "in")
    before = snapshot(tmp_path)
    assert prepare(src, tok, out) == 2
    assert "train (a symbolic link)" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("which", ["root", "dangling", "home", "cwd", "symlinked-dir"])
def test_data_prepare_paths_that_are_no_output_dir(which, tok, tmp_path, monkeypatch, capsys):
    src = corpus(tmp_path / "in")
    out, keep = _bad_out(tmp_path, which, monkeypatch)
    out = os.path.expanduser(out)
    before, root_before = snapshot(keep), sorted(os.listdir("/"))
    assert prepare(src, tok, out) == 2
    one_line_error(capsys)
    assert snapshot(keep) == before and sorted(os.listdir("/")) == root_before
    assert not (tmp_path / "target").exists()


def test_data_merge_never_removes_a_user_file(tok, tmp_path, capsys):
    src = corpus(tmp_path / "in", files=2)
    parts = [tmp_path / f"t{i}" for i in range(2)]
    for i, p in enumerate(parts):
        assert prepare(src, tok, p, "--num-tasks", "2", "--task-index", str(i)) == 0
    out = tmp_path / "merged"
    (out / "val").mkdir(parents=True)
    (out / "val" / "notes.txt").write_text("mine\n")
    capsys.readouterr()
    assert main(["data", "merge", *map(str, parts), "--out", str(out), "--quiet"]) == 2
    assert "val/notes.txt" in one_line_error(capsys)
    assert snapshot(out) == {"val": "dir", "val/notes.txt": b"mine\n"}
    (out / "val" / "notes.txt").unlink()
    assert main(["data", "merge", *map(str, parts), "--out", str(out), "--quiet"]) == 0
    assert (out / "manifest.json").is_file()


def test_a_file_put_into_train_while_prepare_runs_is_not_removed(tok, tmp_path, monkeypatch, capsys):
    import llama_pretrain.data.phase2.run as run_stage

    out = tmp_path / "out"
    assert prepare(corpus(tmp_path / "old", seed=2), tok, out) == 0

    def dataset() -> dict:  # what a reader sees (the work files of phase 1 are replaced as they go)
        return {k: v for k, v in snapshot(out).items() if not k.startswith("_work")}

    earlier = dataset()
    real_write = run_stage.run_write

    def user_saves_a_file(*args):  # after the up-front check, before the swap
        (out / "train" / "late.txt").write_text("mine\n")
        return real_write(*args)

    monkeypatch.setattr(run_stage, "run_write", user_saves_a_file)
    src = corpus(tmp_path / "in")
    capsys.readouterr()
    assert prepare(src, tok, out) == 2
    assert "train/late.txt" in one_line_error(capsys)
    assert dataset() == {**earlier, "train/late.txt": b"mine\n"} and not leftovers(tmp_path)
