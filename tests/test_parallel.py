"""Data-parallel training through torchrun on CPU (gloo): DDP and FSDP2 equal one process with
accumulation, sharded checkpoints reshard across world sizes, a dead rank ends the job and a
torchrun restart resumes it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.cli import cli_env
from helpers.parallel import assert_same_run, grad_norms, losses, parallel_cmd, train, weights
from helpers.train_data import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("pdata") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One process, micro-batch 2 x accumulation 4, 6 steps."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(0, data, run, "--training.max_steps=6")
    return run


@pytest.mark.parametrize("mode,extra", [("ddp", []), ("fsdp", []),
                                        ("fsdp", ["--parallel.activation_checkpointing=true"])],
                         ids=["ddp", "fsdp", "fsdp+activation-checkpointing"])
def test_two_ranks_equal_one_process_with_accumulation(mode, extra, data, reference, tmp_path):
    run = tmp_path / mode
    r = train(2, data, run, "--training.max_steps=6", f"--parallel.mode={mode}", *extra)
    assert_same_run(reference, run)
    assert "2 rank(s)" in r.stderr and "2 accumulation" in r.stderr
    # Rank 0 alone writes metrics: every step exactly once.
    assert sorted(losses(run)) == list(range(1, 7))


def test_fsdp_clips_by_the_global_norm(data, tmp_path):
    # A limit below every step's norm, so every step clips. AdamW is nearly blind to a constant
    # gradient scale, so the weights alone would not reveal a rank clipping by its own shards'
    # norm: the norm each step used (logged before clipping) must be the one-process norm.
    clip = ["--training.max_steps=3", "--optimizer.grad_clip=0.3"]
    one = tmp_path / "one"
    train(0, data, one, *clip)
    assert len(grad_norms(one)) == 3 and min(grad_norms(one)) > 0.3
    two = tmp_path / "fsdp"
    train(2, data, two, *clip, "--parallel.mode=fsdp")
    assert grad_norms(two) == pytest.approx(grad_norms(one), rel=1e-5)
    assert_same_run(one, two)


def test_sharded_checkpoint_resumes_on_other_world_sizes(data, reference, tmp_path):
    # Written by 2 FSDP ranks (one shard file per rank), resumed by 1 process.
    two = tmp_path / "two_then_one"
    train(2, data, two, "--training.max_steps=4", "--parallel.mode=fsdp")
    ckpt = two / "checkpoints" / "step-0000004"
    assert len(list(ckpt.glob("*.distcp"))) == 2
    train(0, data, two, "--training.max_steps=6")
    assert_same_run(reference, two, steps=[5, 6])
    # Written by 1 process, resumed by 2 FSDP ranks.
    one = tmp_path / "one_then_two"
    train(0, data, one, "--training.max_steps=4")
    train(2, data, one, "--training.max_steps=6", "--parallel.mode=fsdp")
    assert_same_run(reference, one, steps=[5, 6])


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (children of the agent)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry.name)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in _worker_pids(proc.pid).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()


def _kill_rank_after_step(proc: subprocess.Popen, run_dir: Path, rank: int, step: int, timeout: float = 120):
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the job ended before the rank could be killed")
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            pids = _worker_pids(proc.pid)
            if rank in pids:
                os.kill(pids[rank], signal.SIGKILL)
                return
        time.sleep(0.05)
    raise AssertionError("the run never reached the step to kill at")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find torchrun's workers")
def test_dead_rank_ends_the_job_and_a_restart_resumes(data, tmp_path):
    slow = ["--training.max_steps=40", "--parallel.mode=ddp"]
    # Without restarts: the job exits non-zero, promptly, instead of hanging in a collective.
    # Output goes to files: an unread pipe would fill up and block the workers.
    run = tmp_path / "dies"
    log = open(tmp_path / "dies.log", "w")
    proc = subprocess.Popen(parallel_cmd(2, data, run, *slow), env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    _kill_rank_after_step(proc, run, rank=1, step=3)
    killed_at = time.time()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError("the job hung after a rank died") from None
    assert proc.returncode != 0
    assert time.time() - killed_at < 90
    # With --max-restarts: torchrun restarts every rank; they resume from the last checkpoint and
    # the run completes with each step logged once. (More than one restart is allowed so that a
    # slow re-rendezvous on a loaded machine is retried rather than failing the test.)
    run = tmp_path / "restarts"
    cmd = parallel_cmd(2, data, run, "--training.max_steps=8", "--parallel.mode=ddp", restarts=3)
    log = open(tmp_path / "restarts.log", "w")
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    _kill_rank_after_step(proc, run, rank=1, step=5)
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError("the restarted job hung: "
                             + (tmp_path / "restarts.log").read_text()[-2000:]) from None
    err = (tmp_path / "restarts.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err
    assert sorted(losses(run)) == list(range(1, 9))
    ref = tmp_path / "uninterrupted"
    train(2, data, ref, "--training.max_steps=8", "--parallel.mode=ddp")
    assert_same_run(ref, run, atol=1e-6)


def test_export_hf_reads_a_sharded_training_checkpoint(data, reference, tmp_path):
    """A 2-rank FSDP checkpoint converts straight to Hugging Face, with the run's final weights."""
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "fsdp"
    train(2, data, run, "--training.max_steps=2", "--parallel.mode=fsdp", "--checkpoint.export_final=false")
    ckpt = run / "checkpoints" / "step-0000002"
    r = subprocess.run([sys.executable, "-m", "llama_pretrain", "export-hf", str(ckpt), "--out",
                        str(tmp_path / "hf")], env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from llama_pretrain import load_model
    ours = load_model(ckpt)
    tokens = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4
    # The checkpoint's weights are the run's weights after step 2: same as a 1-process run's.
    one = tmp_path / "one"
    train(0, data, one, "--training.max_steps=2")
    torch.testing.assert_close(ours.state_dict()["output.weight"], weights(one)["output.weight"],
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", ["cuda:abc", "gpu", "cuda:99"])
def test_bad_device_is_a_user_error(device):
    from llama_pretrain import UserError
    from llama_pretrain.devices import resolve_device

    with pytest.raises(UserError, match="training.device"):
        resolve_device(device, 0, flag="training.device")


def test_a_config_error_under_torchrun_is_said_once(data, tmp_path):
    # Every rank reads the same flags and config: rank 0 alone reports what is wrong with them.
    r = subprocess.run(parallel_cmd(2, data, tmp_path / "r", "--training.max_steps=abc"), env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "llama-pretrain train: error:" in ln]
    assert len(lines) == 1 and "training.max_steps" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_a_mistyped_flag_under_torchrun_is_said_once(data, tmp_path):
    r = subprocess.run(parallel_cmd(2, data, tmp_path / "r", "--training.maxsteps=5"), env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("did you mean --training.max_steps?") == 1, r.stderr[-2000:]
