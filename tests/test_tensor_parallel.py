"""Tensor + sequence parallelism on a 2-D (dp, tp) mesh through torchrun on CPU (gloo): the same
run as one process (losses, gradient norms, final weights), checkpoints that reshard across
layouts, and the layouts that cannot work refused in one line.

The global batch is 8 sequences of 32 tokens: one process runs micro-batch 2 x accumulation 4;
dp 2 x tp 2 runs micro-batch 2 x accumulation 2 per data-parallel group (both tp ranks of a group
read the same rows). Every step clips (grad_clip below every step's norm), so a norm computed over
part of the mesh would show in the logged norms."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import cli_env
from helpers.parallel import assert_same_run, grad_norms, losses, train, weights
from helpers.runs import read_metrics
from helpers.train_data import make_dataset

STEPS = ["--training.max_steps=6", "--optimizer.grad_clip=0.5", "--training.eval_every_steps=3",
         "--training.eval_batches=2"]
TP22 = ["--parallel.mode=fsdp", "--parallel.tp=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tpdata") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One process, 6 steps, a checkpoint every 2."""
    run = tmp_path_factory.mktemp("tpref") / "run"
    train(0, data, run, *STEPS)
    assert min(grad_norms(run)) > 0.5  # every step clips
    return run


@pytest.fixture(scope="module")
def dp2_tp2(data, reference, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tp22") / "run"
    r = train(4, data, run, *STEPS, *TP22)
    assert "2 accumulation" in r.stderr
    return run


def test_dp2_tp2_equals_one_process(reference, dp2_tp2):
    assert_same_run(reference, dp2_tp2, atol=1e-5)
    # Clipped by the norm over the whole mesh (both axes), as one process computes it.
    assert grad_norms(dp2_tp2) == pytest.approx(grad_norms(reference), rel=1e-5)
    assert sorted(losses(dp2_tp2)) == list(range(1, 7))  # rank 0 alone logs: each step once
    ckpt = dp2_tp2 / "checkpoints" / "step-0000006"
    assert len(list(ckpt.glob("*.distcp"))) == 4
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["world_size"], state["tp"], state["data_parallel"]) == (4, 2, 2)
    assert json.loads((dp2_tp2 / "run.json").read_text())["config"]["parallel"]["tp"] == 2


def val_losses(run_dir: Path) -> dict[int, float]:
    recs = read_metrics(run_dir)
    return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


def test_dp1_tp2_with_activation_checkpointing_equals_one_process(data, reference, tmp_path):
    # One data-parallel group: FSDP has nothing to shard over and is not applied.
    run = tmp_path / "tp2"
    train(2, data, run, *STEPS, *TP22, "--parallel.activation_checkpointing=true")
    assert_same_run(reference, run, atol=1e-5)
    assert grad_norms(run) == pytest.approx(grad_norms(reference), rel=1e-5)
    # Validation reads the same rows as one process (one data-parallel group), through the
    # vocabulary-parallel loss.
    assert sorted(val_losses(run)) == [1, 3, 6]
    for step, loss in val_losses(reference).items():
        assert val_losses(run)[step] == pytest.approx(loss, abs=1e-5)


def test_nonfinite_step_is_skipped_by_every_rank(data, tmp_path):
    # Step 2's loss is NaN on every rank: the whole mesh skips that optimizer step (a rank that
    # stepped alone would leave its shards out of step), as one process does.
    nan = ["--training.max_steps=3", "--training.debug_nan_at_step=2"]
    one, two = tmp_path / "one", tmp_path / "tp2"
    train(0, data, one, *nan)
    train(2, data, two, *nan, "--parallel.mode=none", "--parallel.tp=2")
    recs = read_metrics(two)
    assert [r["step"] for r in recs if "skipped" in r] == [2]
    assert losses(two)[3] == pytest.approx(losses(one)[3], abs=1e-5)
    for name, w in weights(one).items():
        torch.testing.assert_close(weights(two)[name], w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow  # ~20 s: inductor compiles on CPU
def test_dp1_tp2_compiled_equals_one_process(data, reference, tmp_path):
    # Tensor parallelism, then torch.compile per block; validation runs the blocks eagerly.
    # The gradient norms are the sharp check: a compiled all-gather whose backward does not sum
    # the shards' gradients left the loss of step 1 exact and its norm 3% off.
    run = tmp_path / "tp2c"
    train(2, data, run, *STEPS, *TP22, "--parallel.compile=true")
    assert_same_run(reference, run, atol=1e-5)
    assert grad_norms(run) == pytest.approx(grad_norms(reference), rel=1e-5)
    for step, loss in val_losses(reference).items():
        assert val_losses(run)[step] == pytest.approx(loss, abs=1e-5)


def _at_step_4(run: Path, dest: Path) -> Path:
    """A copy of ``run`` as it was after step 4 (its step-4 checkpoint the newest)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-0000006")
    shutil.rmtree(dest / "final")
    return dest


@pytest.mark.parametrize("nproc,layout", [(0, []), (4, ["--parallel.mode=fsdp"]),
                                          (2, ["--parallel.mode=none", "--parallel.tp=2"])],
                         ids=["one-process", "dp4-tp1", "dp1-tp2"])
def test_dp2_tp2_checkpoint_resumes_on_other_layouts(nproc, layout, data, reference, dp2_tp2, tmp_path):
    run = _at_step_4(dp2_tp2, tmp_path / "run")
    r = train(nproc, data, run, *STEPS, *layout)
    assert "written by 4 rank(s) as dp 2 x tp 2" in r.stderr
    assert_same_run(reference, run, steps=[5, 6], atol=1e-5)


def test_dp2_tp2_checkpoint_exports_in_one_process(reference, dp2_tp2, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = dp2_tp2 / "checkpoints" / "step-0000006"
    from llama_pretrain.cli import main as cli_main

    # In this (pytest's) process: no process group, as a user's laptop would read it.
    assert cli_main(["export-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["train", "--export-checkpoint", str(ckpt), "--out", str(tmp_path / "native")]) == 0
    from safetensors.torch import load_file
    native = load_file(str(tmp_path / "native" / "model.safetensors"))
    for name, w in weights(reference).items():
        torch.testing.assert_close(native[name], w, atol=1e-5, rtol=1e-4, msg=name)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from llama_pretrain import load_model
    ours = load_model(reference / "final")
    tokens = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


# -- layouts that cannot work: one-line errors, before anything is built -------------------------
def check_layout(mode: str, tp: int, n_heads: int, n_kv_heads: int, seq_len: int, world_size: int,
                 launched: bool, compile: bool = False, activation_checkpointing: bool | str = False) -> None:
    """``check_parallel`` on a run config, a process and a model with these settings."""
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.train.config import ParallelConfig, RunConfig
    from llama_pretrain.train.distributed import DistInfo
    from llama_pretrain.train.parallelize import check_parallel

    cfg = RunConfig(parallel=ParallelConfig(mode=mode, tp=tp, compile=compile,
                                            activation_checkpointing=activation_checkpointing))
    cfg.training.seq_len = seq_len
    model_cfg = ModelConfig.from_preset("llama2-debug", n_heads=n_heads, n_kv_heads=n_kv_heads)
    check_parallel(cfg, DistInfo(world_size=world_size, launched=launched), model_cfg)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="ddp", tp=2), "parallel.mode=ddp cannot be combined with parallel.tp=2"),
    (dict(tp=3), "parallel.tp=3 does not divide model.n_heads=4"),
    (dict(tp=4), "parallel.tp=4 does not divide model.n_kv_heads=2"),
    (dict(tp=2, seq_len=33), "training.seq_len=33 is not divisible by parallel.tp=2"),
    (dict(tp=2, world_size=6, launched=False), "needs torchrun"),
    (dict(tp=4, n_kv_heads=4, world_size=6), "world size 6 is not divisible by parallel.tp=4"),
    (dict(tp=2, world_size=4, mode="none"), "leaves 2 data-parallel groups unsynchronised"),
    (dict(tp=2, compile=True, activation_checkpointing="full"), "parallel.compile with parallel.activation"),
])
def test_bad_layout_is_a_one_line_error(kwargs, message):
    from llama_pretrain import UserError

    args = dict(mode="fsdp", tp=2, n_heads=4, n_kv_heads=2, seq_len=32,
                world_size=4, launched=True)
    args.update(kwargs)
    with pytest.raises(UserError, match=message) as e:
        check_layout(**args)
    assert "\n" not in str(e.value)


def test_good_layouts_pass():
    check_layout("fsdp", 2, 4, 2, 32, 4, True)
    check_layout("none", 2, 4, 2, 32, 2, True)
    check_layout("ddp", 1, 4, 2, 33, 3, False)  # tp 1: nothing to check
    check_layout("fsdp", 2, 4, 2, 32, 4, True, compile=True, activation_checkpointing="none")
    check_layout("fsdp", 2, 4, 2, 32, 4, True, compile=False, activation_checkpointing=True)


def test_tp_without_torchrun_is_refused_by_the_cli(data, tmp_path):
    cmd = [sys.executable, "-m", "llama_pretrain", "train", "--run-dir", str(tmp_path / "run"),
           f"--data.path={data}", "--model.preset=llama2-debug", "--training.seq_len=32",
           "--parallel.tp=2", "--parallel.mode=fsdp", "--training.device=cpu"]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert "parallel.tp=2 needs torchrun" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_accumulation_divides_by_the_data_parallel_size():
    from llama_pretrain import UserError
    from llama_pretrain.train.config import load_run_config

    cfg = load_run_config(overrides=["model.preset=llama2-debug", "training.seq_len=32",
                                     "training.micro_batch_size=2", "training.global_batch_tokens=256",
                                     "parallel.tp=2"])
    assert cfg.accumulation_steps(4) == 2  # dp 2: 256 / (32 x 2 x 2)
    assert cfg.accumulation_steps(2) == 4  # dp 1
    with pytest.raises(UserError, match="data-parallel size 8"):
        cfg.accumulation_steps(16)


@pytest.mark.parametrize("value", ["2", 0, -1, 1.5, None])
def test_a_bad_recorded_layout_is_a_user_error(value, dp2_tp2, tmp_path):
    from llama_pretrain import UserError
    from llama_pretrain.interop.training_checkpoint import read_trainer_state

    ckpt = tmp_path / "ckpt"
    shutil.copytree(dp2_tp2 / "checkpoints" / "step-0000006", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "tp": value}))
    with pytest.raises(UserError, match="tp must be a positive integer"):
        read_trainer_state(ckpt)
