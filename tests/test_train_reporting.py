"""What training tells its user in a batch job: plain log lines, honest throughput and MFU, a CPU
peak measured once per machine, files others can read, and a full disk as one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.train import metrics
from llama_pretrain.train.config import load_run_config

from helpers.runs import as_overrides, tiny_run
from helpers.train_data import make_dataset

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step (\d+)/(\d+)  loss \S+  lr \S+  grad norm \S+  [\d,]+ tok/s  MFU [\d.]+%"
                  r"(  val loss [\d.]+)?  ETA \S+$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data")


@pytest.fixture(autouse=True)
def peak_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own matmul-peak cache (never the user's)."""
    monkeypatch.setenv(metrics.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "matmul_peak.json"


# The progress bar and the peak FLOPS left to their defaults: what is reported is the subject here.
ITEMS = tiny_run({"training.max_steps": 6, "schedule.warmup_steps": 100, "training.eval_every_steps": 3,
                  "training.eval_batches": 2, "checkpoint.every_steps": 0, "logging.every_steps": 2},
                 drop=["logging.progress", "logging.peak_flops"])


def small_cfg(data: Path, **over):
    items = {"data.path": str(data), **ITEMS, **over}
    return load_run_config(None, as_overrides(items))


def train(cfg, run_dir: Path) -> dict:
    from llama_pretrain.train.loop import train as run
    return run(cfg, run_dir)


# -- 3. logs for batch jobs ---------------------------------------------------------------------
def progress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("step ")]


def test_train_with_stderr_in_a_file_logs_one_plain_line_per_every_steps(dataset, tmp_path):
    toml = tmp_path / "run.toml"
    sections: dict[str, list[str]] = {}
    for key, value in {"data.path": str(dataset), **ITEMS}.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {json.dumps(value)}")
    toml.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items()))
    log = tmp_path / "train.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "llama_pretrain", "train", "--config", str(toml),
                            "--run-dir", str(tmp_path / "run")], stderr=fh, stdout=subprocess.PIPE,
                           text=True, env=env, cwd=tmp_path, timeout=300)
    raw = log.read_bytes()  # read_text() would turn carriage returns into newlines
    err = raw.decode()
    assert r.returncode == 0, err
    assert b"\r" not in raw
    lines = progress_lines(err)
    assert [LINE.match(line).group(1) for line in lines] == ["2", "4", "6"], err
    assert "val loss" in lines[1] and "ETA 0s" in lines[-1]
    assert max(map(len, err.splitlines())) < 1000  # a tqdm bar in a file: 28,000-character lines


def test_progress_false_still_logs_plain_lines(dataset, tmp_path, capsys):
    train(small_cfg(dataset, **{"logging.progress": False, "logging.every_steps": 3}), tmp_path / "run")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [LINE.match(line).group(1) for line in progress_lines(err)] == ["3", "6"]


# -- 4. honest figures ----------------------------------------------------------------------------
def test_summary_throughput_is_tokens_over_wall_time_and_mfu_follows(dataset, tmp_path, capsys):
    # Long validations make the per-step rates (which exclude them) far faster than the run.
    cfg = small_cfg(dataset, **{"training.eval_every_steps": 2, "training.eval_batches": 40})
    t0 = time.perf_counter()
    s = train(cfg, tmp_path / "run")
    wall = time.perf_counter() - t0
    assert s["tokens_seen"] == 6 * 256
    assert s["tokens_per_s"] == pytest.approx(s["tokens_seen"] / s["elapsed_s"], rel=0.02)
    assert s["elapsed_s"] <= wall and s["tokens_per_s"] >= s["tokens_seen"] / wall
    records = metrics.read_metrics(tmp_path / "run" / "metrics.jsonl")
    step_rates = [r["tokens_per_s"] for r in records[1:]]
    assert sum(step_rates) / len(step_rates) > 1.2 * s["tokens_per_s"]  # the old figure was inflated
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * run["flops_per_token"] / run["peak_flops"], rel=1e-6)


def test_cpu_peak_is_measured_once_per_machine_and_reused(peak_cache, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: calls.append(a) or 1e12)
    cpu = torch.device("cpu")
    assert metrics.resolve_precision(cpu, "fp32")[1] == 1e12 and len(calls) == 1
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: calls.append(a) or 5e12)
    precision, peak, source = metrics.resolve_precision(cpu, "fp32")
    assert (precision, peak, len(calls)) == ("fp32", 1e12, 1) and str(peak_cache) in source
    # another machine (CPU model, torch version or thread count) has its own entry
    monkeypatch.setattr(metrics, "machine_key", lambda: "another CPU | torch 0 | 1 threads")
    assert metrics.resolve_precision(cpu, "fp32")[1] == 5e12 and len(calls) == 2
    # the configured peak still wins
    assert metrics.resolve_precision(cpu, "fp32", 3e11)[1:] == (3e11, "configured (logging.peak_flops)")


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"k": {"fp32": "fast"}}', "DIR"])
def test_a_damaged_or_unwritable_cache_means_measuring_again(peak_cache, monkeypatch, damage):
    import torch

    peak_cache.parent.mkdir(parents=True)
    if damage == "DIR":  # the cache file's name is taken: nothing can be cached, training goes on
        peak_cache.mkdir()
    else:
        peak_cache.write_text(damage.replace('"k"', json.dumps(metrics.machine_key())))
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: 2e12)
    assert metrics.resolve_precision(torch.device("cpu"), "fp32")[1] == 2e12
    if damage != "DIR":
        assert json.loads(peak_cache.read_text())[metrics.machine_key()]["fp32"] == 2e12


def test_a_resumed_run_keeps_its_own_measured_peak(dataset, tmp_path, peak_cache, monkeypatch):
    run = tmp_path / "run"
    cfg = small_cfg(dataset, **{"logging.peak_flops": 0, "checkpoint.every_steps": 2})
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: 1e14)  # MFU stays below 1
    train(cfg, run)
    first = json.loads((run / "run.json").read_text())["peak_flops"]
    shutil.rmtree(run / "checkpoints" / "step-0000006")  # as if killed after step 4's checkpoint
    peak_cache.unlink()
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *a, **k: 3e14)
    train(cfg, run)
    assert first == 1e14 and json.loads((run / "run.json").read_text())["peak_flops"] == first


# -- 5. files others can read ---------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_weights_and_exports_are_0644_under_umask_022(dataset, tmp_path, umask_022):
    train(small_cfg(dataset, **{"training.max_steps": 2}), tmp_path / "run")
    assert cli_main(["export-hf", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "hf")]) == 0
    outputs = [f for d in ("run/final", "hf") for f in (tmp_path / d).rglob("*") if f.is_file()]
    assert {f.name for f in outputs} >= {"model.safetensors", "config.json"}
    assert {f"{f.relative_to(tmp_path)}: {oct(f.stat().st_mode & 0o777)}" for f in outputs} == \
           {f"{f.relative_to(tmp_path)}: 0o644" for f in outputs}


# -- 7. a full disk -------------------------------------------------------------------------------
def test_export_hf_onto_a_full_disk_is_one_line_and_leaves_the_previous_output(tmp_path, small_disk, capsys):
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer

    for name, dim in (("small", 64), ("big", 256)):  # 0.1 MB and 7 MB of weights
        cfg = ModelConfig.from_preset("llama2-debug", dim=dim)
        save_native(Transformer(cfg).state_dict(), cfg, tmp_path / name)
    out = small_disk / "hf"
    assert cli_main(["export-hf", str(tmp_path / "small"), "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()
    assert cli_main(["export-hf", str(tmp_path / "big"), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"no space left to write {out}" in err and f"bytes are free in {small_disk}" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["hf"]  # no temporary left behind


def test_an_atomic_write_onto_a_full_disk_removes_its_temporary_and_keeps_the_old_file(small_disk):
    from llama_pretrain.fsutil import DiskFull, atomic_file

    target = small_disk / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(DiskFull) as e:
        with atomic_file(target) as fh:
            for _ in range(4):
                fh.write(b"x" * 512 * 1024)
    assert target.read_bytes() == b"previous" and [p.name for p in small_disk.iterdir()] == ["out.bin"]
    assert re.fullmatch(rf"no space left to write {target}: it needs more than [\d,]+ bytes and [\d,]+ bytes "
                        rf"are free in {small_disk}; free some space or write elsewhere", str(e.value))


# -- 8. help that tells the truth -----------------------------------------------------------------
def test_train_help_shows_the_demos_values_beside_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for key, default, demo in (("training.max_steps", 1000, 240), ("schedule.warmup_steps", 2000, 20),
                               ("training.global_batch_tokens", 4194304, 16384)):
        assert f"--{key} V default {default} (demo: {demo})" in out
    assert "--optimizer.beta1 V default 0.9 --" in out  # no "demo:" where the demo keeps the default


# -- 9. reports are callbacks -----------------------------------------------------------------------
def test_a_monitor_is_one_callback_that_hears_every_event(dataset, tmp_path, monkeypatch):
    """A callback added beside the reports gets the run through its events (no trainer): the
    start with the peak run.json records, each step's line with its MFU, then the line complete
    (validation, energy) as metrics.jsonl holds it, and the end after the streams close."""
    from llama_pretrain.train import loop
    from llama_pretrain.train.callbacks import Callback, CallbackList

    heard: list = []

    class Recorder(Callback):
        def on_start(self, run):
            heard.append(("start", run.step, run.peak.flops, run.peak.source, run.precision))

        def on_step(self, step):
            heard.append(("step", step.step, step.line["mfu"], "val_loss" in step.line))

        def on_step_end(self, log):
            heard.append(("step_end", log.step.step))

        def on_log(self, log):
            heard.append(("log", json.loads(json.dumps(log.line))))

        def on_close(self):
            heard.append(("close",))

        def on_end(self):
            heard.append(("end",))

    real = loop.reporting_callbacks
    monkeypatch.setattr(loop, "reporting_callbacks",
                        lambda cfg, is_main: CallbackList([*real(cfg, is_main).callbacks, Recorder()]))
    run = tmp_path / "run"
    summary = train(small_cfg(dataset, **{"training.max_steps": 4, "training.eval_every_steps": 2,
                                          "training.debug_nan_at_step": 3, "logging.peak_flops": 1e14}), run)
    run_json = json.loads((run / "run.json").read_text())
    assert heard[0] == ("start", 0, run_json["peak_flops"], run_json["peak_source"], run_json["precision"])
    assert [h[0] for h in heard[1:]] == ["step", "step_end", "log"] * 4 + ["close", "end"]
    steps = [h for h in heard if h[0] == "step"]
    assert [h[1] for h in steps] == [1, 2, 3, 4] and all(h[2] > 0 for h in steps)
    assert not any(h[3] for h in steps)  # validation comes after on_step
    lines = [h[1] for h in heard if h[0] == "log"]
    assert all("kwh" in line and "mfu" in line for line in lines)
    assert [line["step"] for line in lines if "val_loss" in line] == [1, 2, 4]
    assert lines[2].get("skipped") and lines[2]["loss"] is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == lines  # every line is due here: validation at 1, 2 and 4, the skip at 3
    assert summary == json.loads((run / "summary.json").read_text()) and summary["skipped_steps"] == 1
