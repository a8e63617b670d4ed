"""Reading and writing checkpoints: our format, Hugging Face, and Meta's original layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from .checks import check_shapes, check_weights
from .hf import is_hf_dir, load_hf, save_hf
from .meta import is_meta_dir, load_meta
from .model_dir import check_no_remote_code, model_file, read_model_json
from .native import HF_TOKENIZER, TOKENIZER, is_native_dir, load_native, save_native
from .training_checkpoint import is_training_checkpoint, load_training_checkpoint, training_checkpoint_tokenizer

__all__ = ["load_checkpoint", "load_model", "find_tokenizer", "save_native", "save_hf"]


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(config, Meta-named state dict, format) from a native, HF or Meta checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise UserError(f"{path}: a checkpoint is a directory (model.safetensors + config.json, "
                        "an HF model dir, or a Meta params.json dir)")
    if is_native_dir(path):
        cfg, state = load_native(path)
        fmt = "llama-pretrain"
    elif is_meta_dir(path):
        cfg, state = load_meta(path)
        fmt = "meta"
    elif is_hf_dir(path):
        cfg, state = load_hf(path)
        fmt = "hf"
    elif is_training_checkpoint(path):  # RUN_DIR/checkpoints/step-N (DCP, any world size)
        cfg, state, _ = load_training_checkpoint(path)
        fmt = "training-checkpoint"
    else:
        _not_a_checkpoint(path)
    check_state_dict(cfg, state, path)
    return cfg, state, fmt


def _not_a_checkpoint(path: Path) -> None:
    if os.path.lexists(path / "config.json"):  # one we do not recognise: say what is wrong with it
        read_model_json(path, "config.json")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir() or any(path.glob("step-*")):
        raise UserError(f"{path}: this is a training run directory; pass {path}/final or one of its "
                        f"checkpoints ({path}/checkpoints/step-N)")
    raise UserError(f"{path}: not a llama-pretrain, Hugging Face or Meta checkpoint directory")


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """A ``Transformer`` in eval mode from any supported checkpoint directory."""
    from ..model import Transformer

    cfg, state, _ = load_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    # The checkpoint's tensors become the weights (in the model's dtype unless ``dtype`` is given):
    # no second copy of the model is allocated and filled.
    dtype = dtype or model.output.weight.dtype
    model.load_state_dict({k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()},
                          assign=True)
    if cfg.tie_embeddings:  # one Parameter under both names, as Transformer.__init__ makes it
        model.output.weight = model.tok_embeddings.weight
    model.init_rope()
    return model.eval()


def find_tokenizer(path: str | Path, check: bool = True) -> Path | None:
    """The tokenizer stored in a checkpoint dir (or, for a training checkpoint, the one its run
    was trained with), if any: ``tokenizer.model``, else a Hugging Face ``tokenizer.json``. It must
    be a regular file of the directory (``model_file``) and load (a SentencePiece model, or a
    tokenizer.json with its config files): it is copied into what export-hf / import-hf write."""
    from ..tokenizer import Tokenizer

    if Path(path).is_dir():  # a tokenizer that is code (auto_map) is not the file beside it
        check_no_remote_code(path)
    found = model_file(path, TOKENIZER, required=False) or model_file(path, HF_TOKENIZER, required=False)
    if found is None and is_training_checkpoint(path):
        try:
            found = training_checkpoint_tokenizer(Path(path))
        except UserError:
            return None
    if found is not None and check:  # (check=False: the caller loads it next, with the same error)
        Tokenizer(found)  # a UserError unless it loads
    return found


def check_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], where) -> None:
    """UserError unless ``state`` holds exactly the tensors (names and shapes) ``cfg`` implies, all
    floating point and finite."""
    check_shapes(cfg, {name: tuple(t.shape) for name, t in state.items()}, where)
    check_weights(state, where)
