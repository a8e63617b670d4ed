"""A run killed with SIGKILL at an arbitrary step and resumed logs exactly the losses of an
uninterrupted run (bit-identical on CPU), and the default job's stages (fast smoke + slow full)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.cli import cli_cmd, cli_env
from helpers.runs import as_flags, read_metrics, tiny_run
from helpers.train_data import make_dataset

ARGS = as_flags(tiny_run({"training.max_steps": 10, "schedule.warmup_steps": 3, "checkpoint.every_steps": 3,
                          "training.eval_every_steps": 4, "parallel.mixed_precision": "bf16"}))


def _args(config: Path, run_dir: Path) -> list[str]:
    return ["train", "--config", str(config), "--run-dir", str(run_dir), *ARGS]


def _records(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, missing_ok=True, torn_ok=True)  # polled while the run writes, or killed


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    data = make_dataset(tmp_path / "data")
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\npath = "{data}"\n')
    ref = tmp_path / "ref"
    subprocess.run(cli_cmd(*_args(config, ref)), check=True, env=cli_env(threads=2), capture_output=True)

    kill_after = random.Random().randint(4, 8)  # an arbitrary step, not a checkpoint boundary by design
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_cmd(*_args(config, run)), env=cli_env(threads=2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= kill_after for r in _records(run)):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(cli_cmd(*_args(config, run)), env=cli_env(threads=2), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr

    ref_recs, run_recs = _records(ref), _records(run)
    assert [r["step"] for r in run_recs] == list(range(1, 11))
    for a, b in zip(ref_recs, run_recs):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])  # bit-identical
        assert a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
        assert a.get("val_loss") == b.get("val_loss")
    from safetensors.torch import load_file
    wa, wb = load_file(str(ref / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def _builtin_available() -> bool:
    try:
        import llama_pretrain.data.builtin  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _builtin_available(), reason="built-in corpus module not present")
def test_default_job_smoke(tmp_path, capsys):
    """The no-argument job's whole path on a tiny budget (the full budget is the slow test below)."""
    from llama_pretrain.cli import main

    run = tmp_path / "demo"
    rc = main(["train", "--run-dir", str(run), "--training.max_steps=3", "--training.eval_every_steps=3",
               "--training.global_batch_tokens=4096", "--training.eval_batches=1", "--logging.progress=false",
               "--logging.peak_flops=1e11"])
    out = capsys.readouterr().out
    assert rc == 0
    for key in ("tokens", "train loss", "val loss", "MFU", "plot", "sample"):
        assert key in out
    assert (run / "figure5.png").is_file() and (run / "final" / "tokenizer.model").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _builtin_available(), reason="built-in corpus module not present")
def test_default_job_full_budget(tmp_path):
    """`llama-pretrain train` as a newcomer runs it: within 10 minutes on 2 cores, val loss well down."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "llama_pretrain", "train", "--run-dir", str(tmp_path / "demo"),
                           "--logging.progress=false"], capture_output=True, text=True, env=cli_env(threads=2))
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert elapsed < 600, elapsed
    assert summary["final_val_loss"] < summary["first_val_loss"] - 2.0, summary
