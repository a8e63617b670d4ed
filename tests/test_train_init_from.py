"""Continued pretraining (checkpoint.init_from / train --init-from), and train's mistyped flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_pretrain.cli import main as cli_main
from llama_pretrain.data.loader import TokenLoader
from llama_pretrain.errors import UserError
from llama_pretrain.train.config import load_run_config
from llama_pretrain.train.loop import train
from llama_pretrain.train.distributed import shutdown_distributed

from helpers.runs import as_overrides, read_metrics, tiny_run
from helpers.train_data import make_dataset

VOCAB = 256
# The model is the one init_from names: no preset.
RUN = tiny_run({"training.max_steps": 4, "training.global_batch_tokens": 64, "schedule.warmup_steps": 100,
                "checkpoint.every_steps": 2, "training.seed": 3}, drop=["model.preset"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random tiny Hugging Face Llama, as save_pretrained writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "data", vocab_size=VOCAB)


def run_cfg(data: Path, init_from: Path, *extra: str, **over):
    items = {**RUN, "data.path": str(data), "checkpoint.init_from": str(init_from), **over}
    return load_run_config(None, as_overrides(items) + list(extra))


def first_loss(run_dir: Path) -> float:
    return read_metrics(run_dir)[0]["loss"]


def transformers_loss_on_first_batch(hf_dir: Path, data: Path) -> float:
    """transformers' own loss on the batch the loader gives step 1 (it is deterministic)."""
    from transformers import LlamaForCausalLM

    batch = next(TokenLoader(data, "train", RUN["training.micro_batch_size"], RUN["training.seq_len"],
                             RUN["training.seed"], 0, 1))
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()))


@pytest.mark.parametrize("mode", ["none", "fsdp"])
def test_first_loss_from_an_hf_llama_equals_transformers_loss(mode, hf_dir, dataset, tmp_path):
    cfg = run_cfg(dataset, hf_dir, **{"parallel.mode": mode, "training.max_steps": 1})
    assert cfg.model_config().n_layers == 2 and cfg.model_config().vocab_size == VOCAB  # from the checkpoint
    try:
        train(cfg, tmp_path / "run")
    finally:
        shutdown_distributed()  # FSDP in one process made a process group
    want = transformers_loss_on_first_batch(hf_dir, dataset)
    assert first_loss(tmp_path / "run") == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert abs(want - torch.log(torch.tensor(float(VOCAB))).item()) > 1e-3  # not what any random init gives
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert saved["model"]["dim"] == 64 and "preset" not in saved["model"]  # the architecture actually trained


def test_a_disagreeing_model_key_is_one_line_naming_the_field(hf_dir, dataset, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "{dataset}"\n[training]\nmax_steps = 2\n')
    code = cli_main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "r"), "--init-from", str(hf_dir),
                     "--model.n_layers=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.n_layers gives n_layers=3" in err and "n_layers=2" in err and str(hf_dir) in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="model.preset llama2-debug gives vocab_size=512 but"):
        run_cfg(dataset, hf_dir, **{"model.preset": "llama2-debug"})
    assert run_cfg(dataset, hf_dir, **{"model.n_layers": 2}).model_config().dim == 64  # agreeing keys are fine


def test_llama2_7b_config_with_the_hf_llama2_7b_dir_prints_its_architecture(tmp_path, capsys):
    hf = tmp_path / "Llama-2-7b-hf"  # config only: --print-config reads no weights
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "torch_dtype": "float16"}))
    config = Path(__file__).resolve().parents[1] / "configs" / "llama2-7b.toml"
    assert cli_main(["train", "--config", str(config), "--init-from", str(hf), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "n_kv_heads = 32" in out and "dim = 4096" in out and f'init_from = "{hf}"' in out
    assert cli_main(["train", "--config", str(config), "--init-from", str(hf), "--model.max_seq_len=2048",
                     "--print-config"]) == 2
    assert "model.max_seq_len gives max_seq_len=2048" in capsys.readouterr().err


def test_a_dataset_of_another_tokenizer_or_vocabulary_is_refused(hf_dir, dataset, tmp_path, capsys):
    carrying = tmp_path / "with_tokenizer"
    shutil.copytree(hf_dir, carrying)
    from llama_pretrain.tokenizer import train_tokenizer
    train_tokenizer([f"some other text number {i}" for i in range(300)], carrying / "tokenizer.model",
                    vocab_size=300, progress=False)  # a SentencePiece model, not the dataset's
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\npath = "{dataset}"\n[training]\nmax_steps = 2\nseq_len = 32\n')
    code = cli_main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "r"), "--init-from", str(carrying)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "another tokenizer" in err and "sha256" in err, err

    other_vocab = make_dataset(tmp_path / "v300", vocab_size=300, train_tokens=5_000, val_tokens=1_000)
    toml.write_text(f'[data]\npath = "{other_vocab}"\n[training]\nmax_steps = 2\nseq_len = 32\n')
    code = cli_main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "r"), "--init-from", str(hf_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "vocabulary of 300" in err and f"checkpoint.init_from {hf_dir} has vocab_size {VOCAB}" in err
    assert not (tmp_path / "r").exists()


def test_a_killed_run_resumes_from_its_own_checkpoint_not_from_init_from(hf_dir, dataset, tmp_path, capsys):
    whole = tmp_path / "whole"
    train(run_cfg(dataset, hf_dir), whole)
    killed = tmp_path / "killed"
    train(run_cfg(dataset, hf_dir), killed)
    for later in ("checkpoints/step-0000004", "final", "summary.json"):  # as if killed after step 2's save
        shutil.rmtree(killed / later) if (killed / later).is_dir() else (killed / later).unlink()
    capsys.readouterr()
    train(run_cfg(dataset, hf_dir), killed)
    err = capsys.readouterr().err
    assert "resuming from" in err and "starting from" not in err, err
    from safetensors.torch import load_file
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # init weights again would differ
    steps = [r["step"] for r in read_metrics(killed)]
    assert steps == [1, 2, 3, 4]


def test_a_training_checkpoint_is_a_starting_point_too(hf_dir, dataset, tmp_path):
    first = tmp_path / "first"
    train(run_cfg(dataset, hf_dir, **{"training.max_steps": 2}), first)
    ckpt = first / "checkpoints" / "step-0000002"
    second = tmp_path / "second"
    train(run_cfg(dataset, ckpt, **{"training.max_steps": 1}), second)
    state = json.loads((second / "checkpoints" / "step-0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1  # a fresh step count
    assert first_loss(second) < first_loss(first)  # it starts from the trained weights


# -- train's command line -------------------------------------------------------------------------
@pytest.mark.parametrize("typo,meant", [("--training.maxsteps=5", "--training.max_steps"),
                                        ("--trainig.max_steps", "--training.max_steps"),
                                        ("--init-form", "--init-from")])
def test_a_mistyped_flag_shows_train_usage_and_the_closest_key(typo, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", typo, "5"] if "=" not in typo else ["train", typo])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "usage: llama-pretrain train" in err and f"did you mean {meant}?" in err, err
