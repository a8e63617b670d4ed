"""Next-token cross-entropy for training, without an fp32 copy of the [tokens x vocab] logits.

``F.cross_entropy(logits.float(), ...)`` on bf16 logits materialises an fp32 copy of the logits
and keeps an fp32 log-softmax of the same size for backward: at 4096 tokens x 32000 vocab that is
1 GiB per micro-batch on top of the bf16 logits. ``chunked_cross_entropy`` instead walks the rows
in chunks, upcasting one chunk at a time, and keeps only the logits it was given (no copy) plus
one fp32 log-sum-exp per row; backward recomputes softmax chunk by chunk and writes the gradient
in the logits' dtype.

``training.fused_loss=auto`` uses the chunked path for low-precision logits (any device) and on
CPU (where cache-sized chunks also beat ``F.cross_entropy`` on fp32 logits: 0.18 s vs 0.26 s
forward + backward for 2048 x 32000, BENCHMARKS.md section train); fp32 logits on a GPU go
through ``F.cross_entropy``.

The loss is computed from ``model(tokens)`` (the logits) rather than from ``hidden_states`` so that
DDP/FSDP hooks on the model's ``forward`` run as they must.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        picked = torch.empty(n, dtype=torch.float32, device=logits.device)
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        for s in range(0, n, chunk_rows):
            chunk = logits[s:s + chunk_rows].float()
            lse[s:s + chunk_rows] = torch.logsumexp(chunk, dim=-1)
            picked[s:s + chunk_rows] = chunk.gather(1, safe_targets[s:s + chunk_rows, None]).squeeze(1)
        count = valid.sum().clamp(min=1)
        loss = ((lse - picked) * valid).sum() / count
        ctx.save_for_backward(logits, safe_targets, valid, lse, count)
        ctx.chunk_rows = chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, valid, lse, count = ctx.saved_tensors
        chunk_rows = ctx.chunk_rows
        grad = torch.empty_like(logits)
        scale = (grad_out / count).float()
        for s in range(0, logits.shape[0], chunk_rows):
            e = s + chunk_rows
            g = torch.exp(logits[s:e].float() - lse[s:e, None])  # softmax
            g.scatter_add_(1, targets[s:e, None], torch.full_like(g[:, :1], -1.0))
            g.mul_((valid[s:e, None] * scale))
            grad[s:e] = g.to(grad.dtype)
        return grad, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [N, V] (any float dtype) against ``targets`` [N] (-100 ignored)."""
    if chunk_rows is None:
        # CPU: chunks that stay in cache (64 rows x 32k vocab x 4 B = 8 MiB) measured fastest;
        # GPU: large chunks keep the kernel count low while bounding the fp32 transient.
        chunk_rows = 1024 if logits.is_cuda else 64
    return _ChunkedCrossEntropy.apply(logits, targets, chunk_rows)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, fused: str = "auto") -> torch.Tensor:
    """Mean next-token loss of ``logits`` [B, T, V] against ``targets`` [B, T], in fp32."""
    flat_logits = logits.flatten(0, 1)
    flat_targets = targets.flatten()
    use_chunked = fused == "on" or (fused == "auto" and (flat_logits.dtype != torch.float32
                                                          or flat_logits.device.type == "cpu"))
    if use_chunked:
        return chunked_cross_entropy(flat_logits, flat_targets)
    return F.cross_entropy(flat_logits.float(), flat_targets, ignore_index=IGNORE_INDEX)
