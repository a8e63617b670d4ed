"""Cross-entropy over a large vocabulary without keeping an fp32 copy of the logits.

``F.cross_entropy(logits.float(), ...)`` keeps the fp32 log-softmax ([tokens x vocab], twice the
size of bf16 logits) alive until backward. ``chunked_cross_entropy`` keeps only the logits it was
given (in the dtype the output head produced) and one fp32 log-sum-exp per row; softmax is
recomputed in fp32, chunk by chunk, in backward, and the gradient is written in the logits' dtype.
The result equals ``F.cross_entropy`` computed in fp32.

Chunks of 64 rows (64 x 32k x 4 B = 8 MiB, cache-sized) make this faster than PyTorch's own
kernel on CPU even for fp32 logits (BENCHMARKS.md, training); on GPU, 1024-row chunks keep the
kernel count low, and fp32 logits use PyTorch's fused kernel, which keeps no more memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_rows: int):
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when given fp64
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], chunk_rows):
            lse[start:start + chunk_rows] = torch.logsumexp(logits[start:start + chunk_rows].to(acc), dim=-1)
        picked = logits.gather(1, safe_targets[:, None]).squeeze(1).to(acc)
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, lse - picked, 0.0).sum() / count
        ctx.save_for_backward(logits, safe_targets, valid, lse, count)
        ctx.chunk_rows = chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, valid, lse, count = ctx.saved_tensors
        chunk = ctx.chunk_rows
        grad = torch.empty_like(logits)
        scale = grad_loss.to(lse.dtype) / count
        rows = torch.arange(logits.shape[0], device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            end = start + chunk
            probs = torch.exp(logits[start:end].to(lse.dtype) - lse[start:end, None])
            probs[rows[start:end] - start, targets[start:end]] -= 1.0
            probs *= valid[start:end, None] * scale
            grad[start:end] = probs
        return grad, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [N, V] (any float dtype) against ``targets`` [N]."""
    if chunk_rows is None:
        chunk_rows = 1024 if logits.is_cuda else 64
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_rows)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  chunked: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy in fp32 (at least); ``chunked=None`` picks the faster path that keeps no
    fp32 copy of low-precision logits: chunked on CPU and for bf16/fp16 logits, else PyTorch's."""
    if chunked is None:
        chunked = logits.device.type == "cpu" or logits.dtype not in (torch.float32, torch.float64)
    if chunked:
        return chunked_cross_entropy(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
