"""A tiny native checkpoint with its own SentencePiece tokenizer, for eval command tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_checkpoint(root: Path, max_seq_len: int) -> tuple[object, dict]:
    """``root/tok.model`` and ``root/ckpt`` (llama2-debug, vocabulary 320, seeded weights);
    returns the model config and state dict (to save in other formats too)."""
    from llama_pretrain.config import ModelConfig
    from llama_pretrain.interop import save_native
    from llama_pretrain.model import Transformer
    from llama_pretrain.tokenizer import train_tokenizer

    text = [f"the {c} sky number {i} is blue and red; def f(x): return x + {i}" for i in range(300)
            for c in ("blue", "red")]
    sp = train_tokenizer(text, root / "tok.model", vocab_size=320, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama2-debug", vocab_size=320, max_seq_len=max_seq_len)
    state = Transformer(cfg).state_dict()
    save_native(state, cfg, root / "ckpt", tokenizer_model=sp)
    return cfg, state
