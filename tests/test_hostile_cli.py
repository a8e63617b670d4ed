"""Hostile inputs and misleading outcomes at the command line (issue 12, parts 6 and 7): each test
is the attack.

JSON nested thousands deep in a samples file, a manifest, a run's run.json or metrics.jsonl; an
--out that names a directory; a shard edited after `data prepare`; a model dir given as --run-dir;
a refused --init-from; code run without a sandbox. Each is one line (exit 2) or an explicit
warning, before the work it would spoil, and leaves nothing it did not mean to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.data.loader import TokenLoader
from llama_pretrain.data.shards import MANIFEST
from llama_pretrain.errors import UserError
from llama_pretrain.eval import sandbox
from llama_pretrain.eval.evaluator import load_samples_file
from llama_pretrain.eval.tasks import TASKS
from llama_pretrain.tokenizer import Tokenizer, train_tokenizer

from helpers.runs import as_flags, read_metrics, tiny_run
from helpers.synthetic_text import make_corpus
from helpers.train_data import make_dataset

VOCAB = 512  # llama2-debug's
DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit
SEQ, MICRO, GLOBAL = 32, 2, 128  # 2 micro-batches of 2 windows per step
TRAIN = as_flags(tiny_run({"training.seq_len": SEQ, "training.micro_batch_size": MICRO,
                           "training.global_batch_tokens": GLOBAL, "training.seed": 0}))
PIQA = {"goal": "open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer(make_corpus(300, seed=1), d / "tok.model", vocab_size=VOCAB, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data", vocab_size=VOCAB,
                        tokenizer_sha256=Tokenizer(tokenizer).sha256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    import torch

    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug")
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_native(Transformer(cfg).state_dict(), cfg, out, tokenizer_model=tokenizer)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dataset) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli_main(["train", "--run-dir", str(run), f"--data.path={dataset}", "--training.max_steps=2",
                     "--checkpoint.export_final=false", *TRAIN]) == 0
    return run


@pytest.fixture
def piqa_data(tmp_path) -> Path:
    path = tmp_path / "evaldata" / "piqa" / f"{TASKS['piqa'].split}.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({**PIQA, "label": i % 2}) + "\n" for i in range(3)))
    return path.parents[1]


def _one_line(capsys, rc: int, progress: bool = False) -> str:
    """The command's stderr, asserted to be exit 2 and one line without a traceback (after the
    lines of the steps it trained, with ``progress``); returns the line."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    if progress:
        lines = [ln for ln in lines if not ln.startswith(("training ", "step "))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# -- 6. JSON nested too deep to parse -------------------------------------------------------------
def test_deep_json_in_the_samples_file_is_one_line(tmp_path, capsys, monkeypatch):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "pass"}) + "\n" + DEEP + "\n")
    with pytest.raises(UserError, match=f"{samples}:2: not valid JSON"):
        load_samples_file(samples)
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ("unshare",))  # the sandbox is not the point
    err = _one_line(capsys, cli_main(["eval", "--tasks", "humaneval", "--samples", str(samples)]))
    assert f"{samples}:2: not valid JSON (nested too deeply" in err


def test_deep_json_manifest_is_one_line_for_every_reader(dataset, tmp_path, capsys):
    d = _copy(dataset, tmp_path / "d")
    (d / MANIFEST).write_text(DEEP)
    with pytest.raises(UserError, match="nested too deeply"):
        TokenLoader(d)
    assert str(d / MANIFEST) in _one_line(capsys, cli_main(["data", "inspect", str(d)]))
    run = tmp_path / "run"
    err = _one_line(capsys, cli_main(["train", "--run-dir", str(run), f"--data.path={d}",
                                      "--training.max_steps=2", *TRAIN]))
    assert f"cannot read {d / MANIFEST}: nested too deeply" in err
    assert not run.exists()


def test_deep_json_in_a_run_dir_is_one_line_on_resume_and_skipped_by_plot(finished_run, dataset, tmp_path,
                                                                          capsys):
    run = _copy(finished_run, tmp_path / "run")
    (run / "run.json").write_text(DEEP)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(DEEP + "\n")
    before = _tree(run)
    err = _one_line(capsys, cli_main(["train", "--run-dir", str(run), f"--data.path={dataset}",
                                      "--training.max_steps=3", *TRAIN]))
    assert f"{run / 'run.json'} is unreadable" in err
    assert _tree(run) == before
    fig = tmp_path / "fig.png"  # a damaged run.json only costs the plot its label
    assert cli_main(["plot", "--out", str(fig), str(run)]) == 0 and fig.stat().st_size > 0


# -- 6. --out that cannot be written: refused before the work -------------------------------------
def test_eval_out_naming_a_directory_is_refused_before_evaluating(checkpoint, piqa_data, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    err = _one_line(capsys, cli_main(["eval", str(checkpoint), "--tasks", "piqa", "--data-dir", str(piqa_data),
                                      "--out", str(out)]))
    assert f"--out {out} is a directory" in err  # and nothing was scored: the one line is all there is
    assert list(out.iterdir()) == []
    under_a_file = tmp_path / "notes.txt"
    under_a_file.write_text("mine")
    err = _one_line(capsys, cli_main(["eval", str(checkpoint), "--tasks", "piqa", "--data-dir", str(piqa_data),
                                      "--out", str(under_a_file / "r.json")]))
    assert f"{under_a_file} is not a directory" in err and under_a_file.read_text() == "mine"


def test_contamination_out_naming_a_directory_is_refused_before_scanning(dataset, tokenizer, piqa_data,
                                                                         tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    err = _one_line(capsys, cli_main(["contamination", "--shards", str(dataset), "--task", "piqa",
                                      "--data-dir", str(piqa_data), "--tokenizer", str(tokenizer),
                                      "--out", str(out)]))
    assert f"--out {out} is a directory" in err and list(out.iterdir()) == []


def _no_constants(name: str):
    raise AssertionError(f"{name} in a JSON file")


def test_eval_out_writes_null_for_nan(checkpoint, piqa_data, tmp_path, capsys):
    out = tmp_path / "r.json"  # one sample: its standard error is not a number
    assert cli_main(["eval", str(checkpoint), "--tasks", "piqa", "--data-dir", str(piqa_data), "--limit", "1",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text(), parse_constant=_no_constants)  # strict JSON: no NaN, Infinity
    assert doc["results"]["piqa"]["acc_norm_stderr"] is None
    assert isinstance(doc["results"]["piqa"]["acc_norm"], float)


# -- 7. a model dir is not a run dir --------------------------------------------------------------
@pytest.mark.parametrize("which", ["model", "step"])
def test_train_refuses_a_model_or_checkpoint_dir_as_run_dir(which, checkpoint, finished_run, dataset, tmp_path,
                                                            capsys):
    src = checkpoint if which == "model" else finished_run / "checkpoints" / "step-0000002"
    target = _copy(src, tmp_path / "target")
    before = _tree(target)
    err = _one_line(capsys, cli_main(["train", "--run-dir", str(target), f"--data.path={dataset}",
                                      "--training.max_steps=2", *TRAIN]))
    assert f"--run-dir {target} holds" in err and "model or checkpoint directory" in err
    assert _tree(target) == before  # no .lock, no run.json, no metrics in the model's dir


def test_a_refused_init_from_leaves_no_lock_and_no_run_dir(checkpoint, dataset, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # refused when loaded
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "{dataset}"\n')
    run = tmp_path / "run"
    args = ["train", "--config", str(toml), "--run-dir", str(run), "--init-from", str(bad),
            *[a for a in TRAIN if "preset" not in a], "--training.max_steps=2"]
    err = _one_line(capsys, cli_main(args))
    assert str(weights) in err
    assert not run.exists()
    run.mkdir()  # an empty dir the user made: kept, only the lock file goes
    _one_line(capsys, cli_main(args))
    assert run.is_dir() and list(run.iterdir()) == []


def test_a_lock_file_removed_between_open_and_flock_is_not_taken(tmp_path, monkeypatch):
    """A failed run unlinks the lock file it created; a job that opened that file a moment before
    and locks it now must not hold a lock nobody else sees while a third job holds the new file."""
    import fcntl
    from types import SimpleNamespace

    from llama_pretrain.train.runlock import LOCK_FILE, RunLock

    run, real_flock, third = tmp_path / "run", fcntl.flock, []

    def flock_after_a_swap(fh, op):
        if not third:  # between our open and our flock: the file is removed, a third job locks anew
            (run / LOCK_FILE).unlink()
            third.append(open(run / LOCK_FILE, "a+"))
            real_flock(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_flock(fh, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_swap)
    with RunLock(run, SimpleNamespace(is_main=True)) as lock:
        with pytest.raises(UserError, match="is in use by another job"):
            lock.acquire()
    third[0].close()


# -- 7. generated code without a sandbox -----------------------------------------------------------
@pytest.fixture
def mbpp(tmp_path) -> tuple[Path, Path]:
    data = tmp_path / "evaldata"
    (data / "mbpp").mkdir(parents=True)
    (data / "mbpp" / f"{TASKS['mbpp'].split}.jsonl").write_text(json.dumps({
        "task_id": 11, "text": "Write a function to add one.", "code": "def f(x):\n    return x + 1",
        "test_list": ["assert f(1) == 2"], "test_setup_code": "", "challenge_test_list": []}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": 11, "completion": "def f(x):\n    return x + 1\n"}) + "\n")
    return data, samples


def _fresh_sandbox_checks():
    sandbox.namespace_prefix.cache_clear()
    warned = getattr(sandbox, "_warn_unsandboxed", None)
    if warned is not None:
        warned.cache_clear()


def test_allow_unsandboxed_warns_on_stderr_when_code_runs_unsandboxed(mbpp, tmp_path, capsys, monkeypatch):
    data, samples = mbpp
    _fresh_sandbox_checks()
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())  # a kernel that refuses namespaces
    out = tmp_path / "r.json"
    assert cli_main(["eval", "--tasks", "mbpp", "--data-dir", str(data), "--samples", str(samples),
                     "--allow-unsandboxed", "--out", str(out)]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "UNSANDBOXED" in warnings[0] and "kernel refuses" in warnings[0], warnings
    assert json.loads(out.read_text())["results"]["mbpp"]["pass@1"] == 1.0


def test_unshare_missing_from_path_is_named_not_the_kernel(mbpp, tmp_path, capsys, monkeypatch):
    data, samples = mbpp
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    _fresh_sandbox_checks()
    try:
        err = _one_line(capsys, cli_main(["eval", "--tasks", "mbpp", "--data-dir", str(data),
                                          "--samples", str(samples)]))
    finally:
        _fresh_sandbox_checks()  # found again once PATH is back
    assert "`unshare` (util-linux) is not on PATH" in err and "kernel" not in err


# -- 6. a token id past the vocabulary, written into a shard after `data prepare` --------------------
def _plant_in_step(d: Path, step: int, value: int) -> tuple[Path, int, int]:
    """Overwrite one token that only step ``step``'s batch reads (the manifest keeps its recorded
    max_token_id, as after an edit of the bytes); returns (shard, offset, the old id)."""
    loader = TokenLoader(d, "train", MICRO, SEQ, seed=0)
    accum = GLOBAL // (MICRO * SEQ)
    pos = loader.window_index((step - 1) * accum * MICRO) * SEQ + 5
    s = int(np.searchsorted(loader._starts, pos, side="right")) - 1
    shard, off = Path(loader._shards[s].filename), pos - int(loader._starts[s])
    toks = np.memmap(shard, dtype="<u2", mode="r+")
    old = int(toks[off])
    toks[off] = value
    toks.flush()
    return shard, off, old


def test_token_id_past_the_vocabulary_in_a_shard_stops_the_run_keeping_its_checkpoints(dataset, tmp_path,
                                                                                     capsys):
    from llama_pretrain.interop import load_checkpoint
    from llama_pretrain.interop.training_checkpoint import list_checkpoints, verify

    d = _copy(dataset, tmp_path / "d")
    shard, off, old = _plant_in_step(d, 3, 65535)
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), f"--data.path={d}", "--training.max_steps=4",
            "--checkpoint.every_steps=1", *TRAIN]
    err = _one_line(capsys, cli_main(args), progress=True)
    assert f"{shard}: token id 65535 at offset {off} " in err and f"vocabulary of {VOCAB}" in err
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000001", "step-0000002"]
    assert all(verify(c) is None for c in ckpts) and load_checkpoint(ckpts[-1])[2] == "training-checkpoint"
    assert not (run / ".lock").exists()
    toks = np.memmap(shard, dtype="<u2", mode="r+")
    toks[off] = old  # the data fixed: the run resumes where it stopped
    toks.flush()
    assert cli_main(args) == 0
    assert "resuming from" in capsys.readouterr().err
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3, 4]
