"""Cross-entropy over a large vocabulary without keeping an fp32 copy of the logits.

``F.cross_entropy(logits.float(), ...)`` keeps the fp32 log-softmax ([tokens x vocab], twice the
size of bf16 logits) alive until backward. Here the forward pass keeps only the logits themselves
(in the dtype the output head produced) and one fp32 log-sum-exp per row; softmax is recomputed
in fp32, chunk by chunk, in backward. The result equals ``F.cross_entropy`` in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ROWS = 2048


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when given fp64
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            lse[start:start + _CHUNK_ROWS] = torch.logsumexp(logits[start:start + _CHUNK_ROWS].to(acc), dim=-1)
        picked = logits.gather(1, safe_targets[:, None]).squeeze(1).to(acc)
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(logits, safe_targets, valid, lse, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, valid, lse, count = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss.to(lse.dtype) / count
        rows = torch.arange(logits.shape[0], device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            end = start + _CHUNK_ROWS
            probs = torch.exp(logits[start:end].to(lse.dtype) - lse[start:end, None])
            probs[rows[start:end] - start, targets[start:end]] -= 1.0
            probs *= (valid[start:end, None] * scale)
            grad[start:end] = probs
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [N, V] against ``targets`` [N], computed in fp32 (at least).

    For fp32 (or fp64) logits, PyTorch's own kernel keeps one log-softmax copy the size of the
    logits, no more than this function would, and is faster; bf16/fp16 logits take the path above.
    """
    if logits.dtype in (torch.float32, torch.float64):
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    return _CrossEntropy.apply(logits, targets, ignore_index)
