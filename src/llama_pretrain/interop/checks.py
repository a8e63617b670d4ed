"""What loaded weights must be, checked without allocating anything the files do not already hold.

A config is compared with the shapes a weight file declares (the safetensors header, a Meta
shard's tensors, DCP's metadata) before any model or merged tensor is allocated, so a config that
claims a bigger model than its weights fails at once instead of exhausting memory. The expected
shapes are computed from the config, not by building a model (even on the meta device that takes
time proportional to ``n_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import ModelConfig
from ..errors import UserError


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``Transformer(cfg).state_dict()``: a tied model's shared
    matrix once, as ``tok_embeddings.weight``, with no ``output.weight``."""
    dim, q_rows, kv_rows, hidden = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    block = {
        "attention.wq.weight": (q_rows, dim), "attention.wk.weight": (kv_rows, dim),
        "attention.wv.weight": (kv_rows, dim), "attention.wo.weight": (dim, q_rows),
        "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
    }
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, dim)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in block.items()})
    shapes["norm.weight"] = (dim,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, dim)
    return shapes


def check_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where) -> None:
    """UserError unless ``shapes`` (name -> shape) are exactly the tensors ``cfg`` implies."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise UserError(f"{where}: tensors do not match the config ({len(shapes)} tensors, the config "
                        f"implies {len(expected)}; missing: {missing[:3]}, unexpected: {extra[:3]})")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise UserError(f"{where}: tensor {name} has shape {tuple(shape)}, config expects {expected[name]}")


def check_weights(state: Mapping[str, torch.Tensor], where) -> None:
    """UserError unless every tensor is floating point and finite (a NaN model scores, silently)."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{where}: tensor {name} is {kind}, not floating point")
        # min and max in one pass, no copy: NaN propagates to both, an infinity is one of them
        if tensor.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            raise UserError(f"{where}: tensor {name} holds NaN or infinite values")


def check_tensors(state, where) -> None:
    """UserError unless ``state`` (what a weights-only unpickler returned) maps names to tensors."""
    if not isinstance(state, dict):
        raise UserError(f"{where}: expected a dict of tensors, got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")


def model_config(fields: dict, where) -> ModelConfig:
    """``ModelConfig.from_dict`` whose errors name the file: "config.json: model.dim must be ..."."""
    try:
        return ModelConfig.from_dict(fields, where=str(where))
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(str(where)) else f"{where}: {e}") from None
