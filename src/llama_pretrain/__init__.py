"""llama-pretrain: the Llama 2 pretraining pipeline in plain PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Transformer", "load_model", "Tokenizer", "UserError", "__version__"]


def __getattr__(name: str):
    # Lazy, so `llama-pretrain --help` and the compute commands start without importing torch.
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    if name == "Transformer":
        from .model import Transformer
        return Transformer
    if name == "load_model":
        from .interop import load_model
        return load_model
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name == "UserError":
        from .errors import UserError
        return UserError
    raise AttributeError(f"module 'llama_pretrain' has no attribute {name!r}")
