"""The training loss: next-token cross-entropy from the model's logits.

The loss is computed from ``model(tokens)`` (the logits) rather than from ``hidden_states`` so that
DDP/FSDP hooks on the model's ``forward`` run as they must. The memory-lean cross-entropy itself
(no fp32 copy of the [tokens x vocab] logits) lives in ``llama_pretrain.losses``.
"""

from __future__ import annotations

import torch

from ..losses import IGNORE_INDEX, chunked_cross_entropy, cross_entropy

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "lm_loss"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, fused: str = "auto") -> torch.Tensor:
    """Mean next-token loss of ``logits`` [B, T, V] against ``targets`` [B, T], in fp32.

    ``fused``: ``auto`` (the faster lean path for the device and dtype), ``on`` (always chunked),
    ``off`` (PyTorch's kernel on fp32-cast logits)."""
    chunked = {"auto": None, "on": True, "off": False}[fused]
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), chunked=chunked)
