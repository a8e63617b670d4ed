"""Continued pretraining: a new run that starts from the weights of an existing checkpoint.

``checkpoint.init_from`` (``train --init-from PATH``) names anything ``interop.load_checkpoint``
reads: our model dir, a Hugging Face or Meta Llama dir, a training checkpoint. The run's
architecture is that checkpoint's; ``model.*`` keys given as well must agree with it. The optimizer,
schedule and step count start fresh. Only a run with no checkpoint of its own starts from it: a
resumed run continues from RUN_DIR/checkpoints, never from ``init_from`` again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UserError

NOT_ARCHITECTURE = {"peak_lr"}  # a ModelConfig field that a run may set freely on top of the checkpoint's
SET_BY = {"ffn_hidden_dim": ("multiple_of", "ffn_dim_multiplier")}  # the fields behind a derived size


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the checkpoint at ``path``, from its config file where it has one (the
    weights are read and checked when the model is built, ``load_weights``)."""
    from ..interop import load_checkpoint
    from ..interop.checks import model_config
    from ..interop.config_files import model_config_from_file
    from ..interop.hf import is_hf_dir
    from ..interop.native import is_native_dir
    from ..interop.training_checkpoint import is_training_checkpoint, read_trainer_state

    p = Path(path)
    if p.is_dir() and (is_native_dir(p) or is_hf_dir(p)):
        return model_config_from_file(p / "config.json")
    if p.is_dir() and is_training_checkpoint(p):
        return model_config(read_trainer_state(p)["identity"]["model"], f"{p}: identity")
    return load_checkpoint(p)[0]  # Meta (params.json lacks the vocabulary size), or the error that says why not


def resolve_architecture(path: str, given: dict[str, Any]) -> ModelConfig:
    """The checkpoint's ModelConfig, checked against the ``model`` keys the config gave (a preset
    stands for all of its fields); a one-line UserError names the first field that disagrees."""
    ckpt = checkpoint_config(path)
    fields = dict(given)
    preset = fields.pop("preset", None)
    expected = (ModelConfig.from_preset(preset, **fields) if preset
                else ModelConfig.from_dict({**ckpt.to_dict(), **fields}, where="[model]"))
    want, have = architecture(expected), architecture(ckpt)
    for key in want:
        if want[key] != have[key]:
            origin = next((f"model.{f}" for f in SET_BY.get(key, (key,)) if f in fields), f"model.preset {preset}")
            raise UserError(f"{origin} gives {key}={want[key]!r} but checkpoint.init_from {path} has "
                            f"{key}={have[key]!r}; drop the model key (the architecture comes from the checkpoint)")
    return dataclasses.replace(ckpt, **{k: getattr(expected, k) for k in NOT_ARCHITECTURE})  # a preset's peak_lr too


def check_tokenizer(path: str, ckpt_vocab: int, tokenizer_sha256: str, vocab_size: int, data_path: str) -> None:
    """The dataset must be tokenized as the checkpoint was: its vocabulary size (``ckpt_vocab``), and
    the same tokenizer.model (sha256) when the checkpoint carries one."""
    from ..interop import find_tokenizer
    from ..fsutil import sha256_file

    if vocab_size != ckpt_vocab:
        raise UserError(f"the dataset {data_path} was tokenized with a vocabulary of {vocab_size}, "
                        f"checkpoint.init_from {path} has vocab_size {ckpt_vocab}; re-tokenize the data "
                        f"with the checkpoint's tokenizer")
    tokenizer = find_tokenizer(path)
    if tokenizer is None or not tokenizer_sha256:
        return
    got = sha256_file(tokenizer)
    if got != tokenizer_sha256:
        raise UserError(f"the dataset {data_path} was made with another tokenizer than checkpoint.init_from "
                        f"{path} (the dataset's sha256 {tokenizer_sha256[:16]}..., {tokenizer}'s {got[:16]}...); "
                        f"re-tokenize the data with {tokenizer}")


def load_weights(model, path: str, model_cfg: ModelConfig) -> str:
    """Copy the checkpoint's weights (validated by ``load_checkpoint``) into ``model``, before it
    is wrapped for DDP / FSDP; returns the checkpoint's format."""
    from ..interop import load_checkpoint

    cfg, state, fmt = load_checkpoint(path)
    if architecture(cfg) != architecture(model_cfg):  # the config file said one thing, the weights another
        raise UserError(f"checkpoint.init_from {path}: its weights are not the architecture its config names")
    model.load_state_dict(state)
    return fmt


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """What the weights' shapes and the forward pass depend on, as sizes (n_kv_heads None and the
    FFN rule's multiple_of / ffn_dim_multiplier written out), so equal models compare equal."""
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
            "vocab_size": cfg.vocab_size, "ffn_hidden_dim": cfg.hidden_dim, "norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len, "tie_embeddings": cfg.tie_embeddings,
            **{k: getattr(cfg, k) for k in ("rope_scaling", "rope_factor", "rope_low_freq_factor",
                                            "rope_high_freq_factor", "rope_original_max_seq_len")}}
