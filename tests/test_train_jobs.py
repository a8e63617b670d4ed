"""Cluster jobs: a signal checkpoints the step in progress and the rerun continues bit for bit (one
process and torchrun); a changed schedule on resume is refused, held constant or re-planned; one
job per run dir (a second is refused, a killed one's lock is taken over); a checkpoint that does
not fit on its filesystem is one line and leaves no partial files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from llama_pretrain.cli import main as cli_main
from llama_pretrain.errors import UserError
from llama_pretrain.interop.training_checkpoint import (STATE_FILE, SUMS_FILE, list_checkpoints, payload_files,
                                                        sha256_file, verify)
from llama_pretrain.train.config import load_run_config
from llama_pretrain.train.optim import lr_at

from helpers.cli import cli_cmd, cli_env
from helpers.runs import as_flags, as_overrides, data_config, read_metrics, tiny_run
from helpers.train_data import make_dataset

STEPS = 40
# Periodic checkpoints far apart: the only one before the end is the one a signal asks for.
ARGS = as_flags(tiny_run({"training.max_steps": STEPS, "schedule.warmup_steps": 3, "checkpoint.every_steps": 1000,
                         "training.device": "cpu", "checkpoint.export_final": False}))


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(data_config(data, run_dir)), "--run-dir", str(run_dir), *ARGS, *extra]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, missing_ok=True)]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before the signal could be sent"
        if any(r["step"] >= step for r in read_metrics(run_dir, missing_ok=True)):
            return
        time.sleep(0.005)
    raise AssertionError(f"the run never reached step {step}")


def _leftovers(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("jobs") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The same run, never stopped."""
    run = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(cli_cmd(*_args(data, run)), check=True, env=cli_env(), capture_output=True, timeout=300)
    return run


# -- preemption -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_checkpoints_the_step_and_the_rerun_is_bit_identical(sig, data, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_cmd(*_args(data, run)), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run, random.Random().randint(3, 6))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    last = max(r["step"] for r in read_metrics(run, missing_ok=True))
    assert last < STEPS
    ckpt = run / "checkpoints" / f"step-{last:07d}"
    assert list_checkpoints(run / "checkpoints") == [ckpt] and verify(ckpt) is None and not _leftovers(run)
    line = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name} at step {last}: saved {ckpt}; resume with: llama-pretrain train" in line

    rerun = subprocess.run(cli_cmd(*_args(data, run)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {ckpt}" in rerun.stderr
    assert _losses(run) == _losses(reference)  # every step once, bit-identical


def _send_after_step(monkeypatch, sig: int, step: int) -> None:
    from llama_pretrain.train.loop import Trainer

    real = Trainer.train_step

    def train_step(self):
        result = real(self)
        if self.state.step == step:
            os.kill(os.getpid(), sig)
        return result
    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_second_signal_during_the_save_leaves_both_checkpoints_whole(data, tmp_path, monkeypatch, capfd):
    import llama_pretrain.train.checkpoint as checkpoint
    from llama_pretrain.train.loop import train
    from llama_pretrain.train.preemption import Preempted

    _send_after_step(monkeypatch, signal.SIGTERM, 3)
    real_seal = checkpoint._seal

    def seal(tmp, state):  # the scheduler's impatient second signal, in the middle of the stop's save
        if tmp.name.endswith("step-0000003"):
            os.kill(os.getpid(), signal.SIGINT)
        real_seal(tmp, state)
    monkeypatch.setattr(checkpoint, "_seal", seal)
    cfg = load_run_config(None, [a[2:] for a in ARGS] + [f"data.path={data}", "checkpoint.every_steps=2"])
    run = tmp_path / "run"
    with pytest.raises(Preempted) as stop:
        train(cfg, run)
    assert stop.value.exit_code == 143 and stop.value.step == 3 and stop.value.trained
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000003"]
    assert all(verify(c) is None for c in ckpts) and not _leftovers(run)
    assert "received SIGINT again" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_signal_before_the_first_step_saves_nothing(data, tmp_path, monkeypatch, capsys):
    from llama_pretrain.train.loop import Trainer

    monkeypatch.setattr(Trainer, "start_clock", lambda self: os.kill(os.getpid(), signal.SIGTERM))
    run = tmp_path / "run"
    rc = cli_main(_args(data, run))
    assert rc == 143
    assert "no step finished: nothing trained yet, nothing saved" in capsys.readouterr().err
    assert list_checkpoints(run / "checkpoints") == [] and not read_metrics(run, missing_ok=True)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_sigterm_to_a_torchrun_job_checkpoints_every_rank_and_resumes(data, tmp_path):
    ddp = ["--parallel.mode=ddp"]
    ref = tmp_path / "ref"
    r = subprocess.run(cli_cmd(*_args(data, ref, *ddp), nproc=2), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    log = open(tmp_path / "run.log", "w")  # a file, not a pipe: an unread pipe would block the ranks
    proc = subprocess.Popen(cli_cmd(*_args(data, run, *ddp), nproc=2), env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    _wait_for_step(proc, run, 4)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to every rank
    proc.wait(timeout=120)
    err = (tmp_path / "run.log").read_text()
    assert proc.returncode != 0
    last = max(r["step"] for r in read_metrics(run, missing_ok=True))
    ckpt = run / "checkpoints" / f"step-{last:07d}"
    assert last < STEPS and verify(ckpt) is None, err[-3000:]
    assert len(list(ckpt.glob("*.distcp"))) == 2  # both ranks wrote the same step
    assert f"saved {ckpt}; resume with: the same torchrun command" in err
    r = subprocess.run(cli_cmd(*_args(data, run, *ddp), nproc=2), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(run) == _losses(ref)


# -- the schedule of a resumed run ------------------------------------------------------------------
def _items(data: Path, **over) -> list[str]:
    """section.key=value settings of a short in-process run whose cosine matters (2 warm-up steps)."""
    return as_overrides(tiny_run({"data.path": str(data), "training.max_steps": 8, "schedule.warmup_steps": 2,
                                  "checkpoint.every_steps": 4, "checkpoint.export_final": False, **over}))


def _cfg(data: Path, **over):
    return load_run_config(None, _items(data, **over))


def _cli(data: Path, run_dir: Path, **over) -> int:
    """The same run through the command line (one-line errors, exit codes)."""
    return cli_main(["train", "--config", str(data_config(data, run_dir)), "--run-dir", str(run_dir),
                     *[f"--{item}" for item in _items(data, **over)]])


def _lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir, missing_ok=True)}


@pytest.fixture()
def finished(data, tmp_path) -> Path:
    """A run that ended its 8-step cosine (peak 1e-3, 2 warm-up steps)."""
    from llama_pretrain.train.loop import train

    run = tmp_path / "run"
    train(_cfg(data), run)
    return run


def test_extending_a_finished_run_is_refused_by_default(data, finished, capsys):
    run = finished
    before = (run / "metrics.jsonl").read_text()
    rc = _cli(data, run, **{"training.max_steps": 12})
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cosine to 0.1 x peak at step 8; this config's is" in err and "at step 12" in err
    assert "--schedule.extend=constant" in err and "--schedule.extend=replan" in err
    assert (run / "metrics.jsonl").read_text() == before


def test_extend_constant_continues_at_the_final_lr(data, finished):
    from llama_pretrain.train.loop import train

    final_lr = _lrs(finished)[8]
    assert final_lr == pytest.approx(1e-4)  # min_lr_ratio x peak at the old last step
    train(_cfg(data, **{"training.max_steps": 12, "schedule.extend": "constant"}), finished)
    assert [_lrs(finished)[s] for s in range(9, 13)] == [final_lr] * 4
    # The checkpoint records the extended schedule: the same config resumes without a choice.
    train(_cfg(data, **{"training.max_steps": 12}), finished)


def test_extend_replan_follows_the_new_cosine(data, finished):
    from llama_pretrain.train.loop import train

    train(_cfg(data, **{"training.max_steps": 12, "schedule.extend": "replan"}), finished)
    lrs = _lrs(finished)
    assert [lrs[s] for s in range(9, 13)] == [lr_at(s - 1, 1e-3, 2, 12, 0.1) for s in range(9, 13)]
    assert lrs[9] > 2 * lrs[8]  # the jump replan asks for


def test_peak_lr_change_mid_run_is_refused_unless_replanned(data, finished):
    from llama_pretrain.train.loop import train

    shutil.rmtree(finished / "checkpoints" / "step-0000008")  # as if stopped at step 4 of 8
    new_peak = {"optimizer.lr": 2e-3}
    with pytest.raises(UserError, match=r"peak 0.001, .*; this config's is peak 0.002"):
        train(_cfg(data, **new_peak), finished)
    with pytest.raises(UserError, match="extend=constant only adds steps"):
        train(_cfg(data, **new_peak, **{"schedule.extend": "constant"}), finished)
    train(_cfg(data, **new_peak, **{"schedule.extend": "replan"}), finished)
    assert _lrs(finished)[5] == lr_at(4, 2e-3, 2, 8, 0.1)


def test_unknown_extend_value_lists_the_choices():
    with pytest.raises(UserError, match="schedule.extend must be one of refuse, constant, replan, got 'grow'"):
        load_run_config(None, ["schedule.extend=grow"])


def test_a_checkpoint_without_a_schedule_record_follows_the_config(data, finished, capsys):
    from llama_pretrain.train.loop import train

    ckpt = list_checkpoints(finished / "checkpoints")[-1]
    state = json.loads((ckpt / STATE_FILE).read_text())
    del state["schedule"]  # as written before the schedule was recorded
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    sums = "".join(f"{sha256_file(f)}  {f.relative_to(ckpt).as_posix()}\n" for f in payload_files(ckpt))
    (ckpt / SUMS_FILE).write_text(sums)
    with pytest.raises(UserError, match="does not record its LR schedule, so --schedule.extend=constant"):
        train(_cfg(data, **{"training.max_steps": 10, "schedule.extend": "constant"}), finished)
    train(_cfg(data, **{"training.max_steps": 10}), finished)
    assert "does not record its LR schedule; following this config's" in capsys.readouterr().err
    assert _lrs(finished)[9] == lr_at(8, 1e-3, 2, 10, 0.1)


# -- one job per run dir ----------------------------------------------------------------------------
def test_a_second_job_on_the_run_dir_is_refused(data, tmp_path):
    # A double submit: the same command twice at once. Long enough that the winner still trains
    # when the other reaches the lock.
    run, steps = tmp_path / "run", 300
    cmd = cli_cmd(*_args(data, run, f"--training.max_steps={steps}"))
    jobs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errs = [job.communicate(timeout=300)[1] for job in jobs]
    codes = sorted(job.returncode for job in jobs)
    assert codes == [0, 2], errs
    winner, loser = (0, 1) if jobs[0].returncode == 0 else (1, 0)
    refusal = errs[loser].strip()
    assert len(refusal.splitlines()) == 1, refusal
    assert (f"{run} is in use by another job (host {socket.gethostname()}, PID {jobs[winner].pid}, since "
            in refusal)
    assert [s for s, _ in _losses(run)] == list(range(1, steps + 1))  # the winner's run, whole
    assert verify(run / "checkpoints" / f"step-{steps:07d}") is None
    assert (run / ".lock").read_text() == ""  # released, holder cleared


def test_the_lock_of_a_killed_job_does_not_block_the_rerun(data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_cmd(*_args(data, run)), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_step(proc, run, 2)
    proc.kill()
    proc.wait()
    assert f'"pid": {proc.pid}' in (run / ".lock").read_text()  # the dead job is still named in the file
    rerun = subprocess.run(cli_cmd(*_args(data, run)), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"taking over the lock of a job that ended without releasing it (host {socket.gethostname()}, " \
           f"PID {proc.pid}" in rerun.stderr
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))


# -- a full filesystem ------------------------------------------------------------------------------
def _page_bytes(d: Path) -> int:
    return sum(math.ceil(f.stat().st_size / 4096) * 4096 for f in d.rglob("*") if f.is_file())


@contextlib.contextmanager
def _tmpfs(where: Path, size: int):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_no_partial_files(data, tmp_path, capsys):
    from llama_pretrain.train.loop import train

    probe = tmp_path / "probe"
    train(_cfg(data, **{"training.max_steps": 2, "checkpoint.every_steps": 2}), probe)
    one_ckpt = _page_bytes(list_checkpoints(probe / "checkpoints")[0])
    # Room for one checkpoint and a half, plus the run's small files: the second save runs out.
    with _tmpfs(tmp_path / "small", one_ckpt * 3 // 2 + 64 * 1024) as small:
        run = small / "run"
        capsys.readouterr()
        rc = _cli(data, run, **{"training.max_steps": 4, "checkpoint.every_steps": 2})
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2
        assert lines[-1].startswith(f"llama-pretrain train: error: no space for the checkpoint of step 4 in "
                                    f"{run / 'checkpoints'}: it needs about ")
        assert "were free; partial files removed, the previous checkpoint" in lines[-1]
        assert any(line.startswith("warning: the checkpoint of step 4 needs about") for line in lines)
        assert not any("Traceback" in line for line in lines)
        assert not _leftovers(run)
        ckpts = list_checkpoints(run / "checkpoints")
        assert [c.name for c in ckpts] == ["step-0000002"] and verify(ckpts[0]) is None
        shutil.rmtree(run)
