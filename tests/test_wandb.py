"""Weights & Biases (logging.wandb), offline: the run files hold metrics.jsonl's scalars and the
resolved config, and a resumed run continues the same W&B run."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.train.config import load_run_config
from llama_pretrain.train.loop import train

from helpers.runs import as_overrides, read_metrics, tiny_run
from helpers.train_data import make_dataset

RUN = tiny_run({"training.max_steps": 4, "training.global_batch_tokens": 64, "schedule.warmup_steps": 100,
                "training.eval_every_steps": 2, "training.eval_batches": 1, "checkpoint.every_steps": 2,
                "logging.wandb": True, "logging.wandb_project": "tests", "logging.wandb_name": "tiny"})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data", train_tokens=8_000, val_tokens=1_000)


def run_cfg(data: Path):
    return load_run_config(None, as_overrides({**RUN, "data.path": data}))


def wandb_records(run_file: Path):
    """The protobuf records of a .wandb file (LevelDB's log format: 32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type; after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts = run_file.read_bytes(), 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE.../LAST sequence
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def offline_history(run_file: Path) -> tuple[dict[int, dict], dict]:
    """(step -> logged scalars, config) from an offline run's file."""
    history, config = {}, {}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history[int(row.pop("_step"))] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind in ("run", "config"):  # the config comes with the run record; updates after it
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return history, config


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    return sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))


def metrics_lines(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir)}


def test_offline_run_holds_the_scalars_and_the_resolved_config(dataset, tmp_path):
    run = tmp_path / "run"
    train(run_cfg(dataset), run)
    run_id = json.loads((run / "run.json").read_text())["wandb_run_id"]
    [run_file] = run_files(run, run_id)
    history, config = offline_history(run_file)
    lines = metrics_lines(run)
    assert sorted(history) == sorted(lines) == [1, 2, 3, 4]
    for step, line in lines.items():
        numbers = {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float))}
        assert history[step] == pytest.approx(numbers, rel=1e-12), step
    assert "val_loss" in history[2] and "loss" in history[4]
    assert config["training"]["max_steps"] == 4
    assert config["model"]["dim"] == 64 and config["model"]["preset"] == "llama2-debug"  # resolved
    assert config["derived"]["accumulation_steps"] == 1


def test_a_resumed_run_continues_the_same_wandb_run(dataset, tmp_path):
    run = tmp_path / "run"
    train(run_cfg(dataset), run)
    run_id = json.loads((run / "run.json").read_text())["wandb_run_id"]
    for later in ("checkpoints/step-0000004", "final", "summary.json"):  # as if killed after step 2's save
        shutil.rmtree(run / later) if (run / later).is_dir() else (run / later).unlink()
    time.sleep(1.05 - time.time() % 1)  # W&B names an offline run's folder by the second it started in
    train(run_cfg(dataset), run)
    assert json.loads((run / "run.json").read_text())["wandb_run_id"] == run_id
    files = run_files(run, run_id)
    assert len(files) == 2  # the second process logged into the same W&B run (same id)
    resumed, _ = offline_history(files[1])
    assert sorted(resumed) == [3, 4]
    assert resumed[4]["loss"] == metrics_lines(run)[4]["loss"]


def test_without_the_package_it_is_one_line_before_anything_is_written(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "{dataset}"\n[logging]\nwandb = true\n')
    assert cli_main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "r"), "--model.preset=llama2-debug",
                     "--training.seq_len=32", "--training.global_batch_tokens=64", "--training.max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'llama-pretrain[wandb]'" in err, err
    assert not (tmp_path / "r" / "run.json").exists()
