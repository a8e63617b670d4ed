"""Turn a training checkpoint (DCP, any world size) into the native single-directory model format."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def export_checkpoint(ckpt: Path, out: Path, tokenizer_model: Path | None = None) -> Path:
    """Read the weights of ``ckpt`` (RUN_DIR/checkpoints/step-N) in one process and write ``out``
    (model.safetensors + config.json [+ tokenizer.model]) for generate / eval / export-hf."""
    import torch

    from ..config import ModelConfig
    from ..interop import save_native
    from ..model import Transformer
    from .checkpoint import load_model_weights, read_trainer_state
    from .config import load_run_config
    from .loop import find_tokenizer_model

    if not (ckpt / "trainer_state.json").is_file():
        raise UserError(f"{ckpt} is not a training checkpoint (no trainer_state.json)")
    state = read_trainer_state(ckpt)
    model_cfg = ModelConfig.from_dict(state["identity"]["model"], where=str(ckpt))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cpu")
    load_model_weights(ckpt, model)
    if tokenizer_model is None:
        cfg = state.get("config", {})
        try:
            run_cfg = load_run_config(base={k: v for k, v in cfg.items() if k in ("data",)})
            tokenizer_model = find_tokenizer_model(run_cfg) if run_cfg.data.path else None
        except UserError:
            tokenizer_model = None
    return save_native(model.state_dict(), model_cfg, out, tokenizer_model=tokenizer_model)

