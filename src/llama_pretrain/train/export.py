"""Turn a training checkpoint (DCP, any world size) into the native single-directory model format."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def is_training_checkpoint(path: Path) -> bool:
    return (Path(path) / "trainer_state.json").is_file()


def load_training_checkpoint(ckpt: Path):
    """(ModelConfig, full state dict on CPU, tokenizer.model or None) of a training checkpoint
    (RUN_DIR/checkpoints/step-N, written by any number of ranks), read in one process."""
    import torch

    from ..config import ModelConfig
    from ..model import Transformer
    from .checkpoint import load_model_weights, read_trainer_state

    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        raise UserError(f"{ckpt} is not a training checkpoint (no trainer_state.json)")
    state = read_trainer_state(ckpt)
    model_cfg = ModelConfig.from_dict(state["identity"]["model"], where=str(ckpt))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)
    return model_cfg, model.state_dict(), _tokenizer_of(state)


def training_checkpoint_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer.model a training checkpoint's run used, when it can still be found."""
    from .checkpoint import read_trainer_state

    return _tokenizer_of(read_trainer_state(Path(ckpt)))


def _tokenizer_of(trainer_state: dict) -> Path | None:
    from .config import load_run_config
    from .loop import find_tokenizer_model

    try:
        run_cfg = load_run_config(base={k: v for k, v in trainer_state.get("config", {}).items() if k == "data"})
        return find_tokenizer_model(run_cfg) if run_cfg.data.path else None
    except UserError:
        return None


def export_checkpoint(ckpt: Path, out: Path, tokenizer_model: Path | None = None) -> Path:
    """Read the weights of ``ckpt`` (RUN_DIR/checkpoints/step-N) in one process and write ``out``
    (model.safetensors + config.json [+ tokenizer.model]) for generate / eval / export-hf."""
    from ..interop import save_native

    model_cfg, state, found_tokenizer = load_training_checkpoint(ckpt)
    return save_native(state, model_cfg, out, tokenizer_model=tokenizer_model or found_tokenizer)

