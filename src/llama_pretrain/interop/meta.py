"""Meta's original checkpoint layout: ``params.json`` + ``consolidated.NN.pth`` (model-parallel shards).

Shards are merged along the dimension Meta's fairscale layers split: column-parallel weights
(wq, wk, wv, w1, w3, output) along rows, row-parallel ones (wo, w2) and the parallel embedding
along columns; norms are replicated. Shards are read as ``torch_files.read_torch_file`` reads
any torch file: shapes from the pickle first, then memory-mapped with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from .checks import check_shapes, model_config
from .model_dir import model_file, read_model_json
from .torch_files import read_torch_file

_ROW_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_COL_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")


def is_meta_dir(path: Path) -> bool:
    return os.path.lexists(path / "params.json") and any(path.glob("consolidated.*.pth"))


def load_meta(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    params_path = path / "params.json"
    params = read_model_json(path, "params.json")
    parts = _read_shards(path)
    axes = {name: _split_axis(name, [p[name] for p in parts], path) for name in parts[0] if name != "rope.freqs"}
    shapes = {name: _merged_shape([p[name] for p in parts], axis) for name, axis in axes.items()}
    cfg = _config(params, shapes, params_path)
    check_shapes(cfg, shapes, path)  # before merging: torch.cat allocates
    state = {name: parts[0][name] if axis is None else torch.cat([p[name] for p in parts], dim=axis)
             for name, axis in axes.items()}
    return cfg, state


def _read_shards(path: Path) -> list[dict[str, torch.Tensor]]:
    """Every consolidated.NN.pth (memory-mapped, see ``read_torch_file``), each a dict of tensors,
    same keys."""
    shards = [model_file(path, f.name) for f in sorted(path.glob("consolidated.*.pth"))]
    if not shards:
        raise UserError(f"{path}: no consolidated.*.pth files")
    parts: list[dict[str, torch.Tensor]] = []
    for f in shards:
        part = read_torch_file(f)
        if parts and set(part) != set(parts[0]):
            raise UserError(f"{f}: holds other tensors than {shards[0].name} "
                            f"({sorted(set(part) ^ set(parts[0]))[:3]})")
        parts.append(part)
    return parts


def _split_axis(name: str, tensors: list[torch.Tensor], where: Path) -> int | None:
    """The axis Meta's model parallelism split ``name`` along; None for a replicated tensor. The
    shards must agree on every other axis."""
    if len(tensors) == 1 or tensors[0].dim() == 1:
        axis = None
    elif name.endswith(_ROW_SPLIT):
        axis = 0
    elif name.endswith(_COL_SPLIT):
        axis = 1
    else:
        raise UserError(f"{where}: unexpected tensor {name!r} in a Meta checkpoint")
    first = tensors[0].shape
    for t in tensors[1:]:
        if t.dim() != len(first) or any(a != b for i, (a, b) in enumerate(zip(t.shape, first)) if i != axis):
            raise UserError(f"{where}: shards disagree on the shape of {name!r} "
                            f"({tuple(first)} and {tuple(t.shape)})")
    return axis


def _merged_shape(tensors: list[torch.Tensor], axis: int | None) -> tuple[int, ...]:
    shape = list(tensors[0].shape)
    if axis is not None:
        shape[axis] = sum(t.shape[axis] for t in tensors)
    return tuple(shape)


def check_scaled_rope(params: dict, where) -> None:
    """Meta's Llama 3.1+ params.json says ``use_scaled_rope`` but not the scaling (its factor was 8
    in Llama 3.1's reference code, 32 in 3.2's): refused rather than guessed."""
    if params.get("use_scaled_rope"):
        raise UserError(f"{where}: use_scaled_rope is set, but Meta's params.json does not record the RoPE "
                        f"scaling's factors; use the Hugging Face release of this model (its config.json does)")


def _config(params: dict, shapes: dict[str, tuple[int, ...]], params_path: Path) -> ModelConfig:
    check_scaled_rope(params, params_path)
    fields = {k: v for k, v in params.items()
              if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                       "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")}
    vocab = fields.get("vocab_size", -1)
    if isinstance(vocab, int) and vocab <= 0 and "tok_embeddings.weight" in shapes:
        fields["vocab_size"] = shapes["tok_embeddings.weight"][0]  # Meta writes -1 here
    fields.setdefault("max_seq_len", 4096)
    return model_config(fields, params_path)


def save_meta(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path) -> Path:
    """Write a single-shard Meta-layout directory (used in tests and for Meta's own tooling)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size, "multiple_of": cfg.multiple_of,
              "ffn_dim_multiplier": cfg.ffn_dim_multiplier, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta}
    (out / "params.json").write_text(json.dumps(params))
    torch.save({k: v.contiguous() for k, v in state.items()}, out / "consolidated.00.pth")
    return out
