"""Downstream evaluation inside training (eval.*): logged at the configured steps, equal at the last
step to `llama-pretrain eval RUN/final`, refused before training when its data is missing."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.errors import UserError
from llama_pretrain.train.config import load_run_config

from helpers.cli import cli_cmd, cli_env
from helpers.runs import as_overrides, read_metrics, tiny_run
from helpers.train_data import make_dataset

VOCAB = 320
LIMIT = 24  # records scored: fine enough that other weights would score otherwise
WORDS = ["red", "blue", "green", "sky", "number", "is", "and", "the", "7", "42"]


def arc_record(i: int, rng: random.Random) -> dict:
    """An arc_easy record (HF field names) whose choices differ per question, so that the scores of
    two checkpoints differ in some of them."""
    choices = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(3)]
    return {"id": f"e{i}", "question": f"the sky number {i} is", "answerKey": rng.choice("ABC"),
            "choices": {"text": choices, "label": ["A", "B", "C"]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a dataset in its vocabulary (and naming its sha256), and arc_easy task data."""
    from llama_pretrain.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("downstream")
    text = [f"the {c} sky number {i} is blue and red" for i in range(300) for c in ("blue", "red")]
    tok = train_tokenizer(text, root / "tok.model", vocab_size=VOCAB, progress=False)
    sha = hashlib.sha256(Path(tok).read_bytes()).hexdigest()
    data = make_dataset(root / "data", vocab_size=VOCAB, tokenizer_sha256=sha)
    shutil.copy(tok, data / "tokenizer.model")
    tasks = root / "tasks"
    (tasks / "arc_easy").mkdir(parents=True)
    rows = [arc_record(i, random.Random(i)) for i in range(LIMIT + 2)]
    (tasks / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, data, tasks


def overrides(data: Path, tasks: Path, **over) -> list[str]:
    return as_overrides(tiny_run({
        "model.vocab_size": VOCAB, "data.path": str(data), "training.max_steps": 4, "optimizer.lr": 1e-2,
        "schedule.warmup_steps": 2, "checkpoint.every_steps": 0, "eval.tasks": "arc_easy", "eval.every_steps": 2,
        "eval.limit": LIMIT, "eval.shots": 0, "eval.data_dir": str(tasks), **over}))


@pytest.fixture(scope="module")
def run(setup):
    """A 4-step run scoring arc_easy every 2 steps (a high LR, so that the scores move)."""
    from llama_pretrain.train.loop import train

    root, data, tasks = setup
    run_dir = root / "run"
    train(load_run_config(None, overrides(data, tasks)), run_dir)
    return run_dir


def metrics_lines(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def test_scores_are_logged_at_the_configured_steps_and_the_last(run):
    scored = {r["step"]: r for r in metrics_lines(run) if "eval/arc_easy/acc" in r}
    assert sorted(scored) == [2, 4]
    assert {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/arc_easy/acc_norm_stderr"} <= set(scored[4])


def test_last_score_equals_the_eval_command_on_final(setup, run, tmp_path):
    _, _, tasks = setup
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(run / "final"), "--tasks", "arc_easy", "--data-dir", str(tasks),
                     "--limit", str(LIMIT), "--shots", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["arc_easy"]
    last = next(r for r in metrics_lines(run) if r["step"] == 4)
    logged = {k.removeprefix("eval/arc_easy/"): v for k, v in last.items() if k.startswith("eval/")}
    assert logged == {m: result[m] for m in result["metrics"] + ["acc_norm_stderr"]}
    earlier = next(r for r in metrics_lines(run) if r["step"] == 2)
    assert earlier["eval/arc_easy/acc"] != last["eval/arc_easy/acc"]  # other weights score otherwise


def test_plain_log_line_shows_the_main_score(setup, tmp_path, capsys):
    from llama_pretrain.train.loop import train

    _, data, tasks = setup
    train(load_run_config(None, overrides(data, tasks, **{"training.max_steps": 2})), tmp_path / "r")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step 2/2")]
    assert lines and "eval arc_easy/acc_norm " in lines[0], lines


def test_plot_metric_draws_the_score_against_tokens(run, tmp_path, capsys):
    png = tmp_path / "acc.png"
    assert cli_main(["plot", str(run), "--metric", "eval/arc_easy/acc", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", str(run), "--metric", "eval/piqa/acc", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval/arc_easy/acc" in err and len(err.splitlines()) == 1  # names what was logged
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("over, message", [
    ({"eval.data_dir": "EMPTY"}, "no 'test' split for task arc_easy"),
    ({"eval.data_dir": "/nonexistent/tasks"}, "eval.data_dir /nonexistent/tasks is not a directory"),
    ({"eval.tasks": "nope"}, "eval.tasks: unknown task 'nope'"),
    ({"eval.limit": 0}, "eval.limit must be positive"),
    ({"eval.shots": -1}, "eval.shots must be >= 0"),
    ({"eval.every_steps": "often"}, "eval.every_steps must be an integer"),
])
def test_bad_eval_settings_are_one_line_before_anything_is_written(setup, tmp_path, capsys, over, message):
    _, data, tasks = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    over = {k: (str(empty) if v == "EMPTY" else v) for k, v in over.items()}
    run_dir = tmp_path / "r"
    rc = cli_main(["train", "--run-dir", str(run_dir), "--config", str(_toml(tmp_path))]
                  + [f"--{o}" for o in overrides(data, tasks, **over)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()


def _toml(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "llama2-debug"\n')
    return path


def test_tasks_take_a_list_or_a_group_and_print_back(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[eval]\ntasks = ["arc_easy", "piqa"]\n')
    cfg = load_run_config(toml)
    assert cfg.eval_task_ids() == ["piqa", "arc_easy"]  # Table 3 order, as eval --tasks
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_run_config(again).eval.tasks == ["arc_easy", "piqa"]
    group = load_run_config(None, ["eval.tasks=commonsense"]).eval_task_ids()
    assert "hellaswag" in group and "winogrande" in group
    with pytest.raises(UserError, match="eval.tasks must be a list of strings"):
        load_run_config(None, ["eval.tasks=3"])


def test_fsdp_ranks_gather_the_weights_rank0_scores(setup, tmp_path):
    """Under torchrun with FSDP every rank joins in gathering the full weights (a collective: a rank
    left out would hang); rank 0's last score is the eval command's on final."""
    import subprocess

    _, data, tasks = setup
    run_dir = tmp_path / "fsdp"
    cmd = cli_cmd("train", "--config", str(_toml(tmp_path)), "--run-dir", str(run_dir),
                  *[f"--{o}" for o in overrides(data, tasks, **{"training.max_steps": 2, "parallel.mode": "fsdp",
                                                                 "training.device": "cpu"})], nproc=2)
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(run_dir / "final"), "--tasks", "arc_easy", "--data-dir", str(tasks),
                     "--limit", str(LIMIT), "--shots", "0", "--out", str(out)]) == 0
    expected = json.loads(out.read_text())["results"]["arc_easy"]
    last = metrics_lines(run_dir)[-1]
    assert last["step"] == 2 and last["eval/arc_easy/acc_norm"] == expected["acc_norm"]
    assert last["eval/arc_easy/acc"] == expected["acc"]
