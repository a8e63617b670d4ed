"""Cross-entropy over a large vocabulary without keeping an fp32 copy of the logits.

``F.cross_entropy(logits.float(), ...)`` keeps the fp32 log-softmax ([tokens x vocab], twice the
size of bf16 logits) alive until backward. ``chunked_cross_entropy`` keeps only the logits it was
given (in the dtype the output head produced) and one fp32 log-sum-exp per row; softmax is
recomputed in fp32, chunk by chunk, in backward, and the gradient is written in the logits' dtype.
The result equals ``F.cross_entropy`` computed in fp32.

Chunks of 64 rows (64 x 32k x 4 B = 8 MiB, cache-sized) make this faster than PyTorch's own
kernel on CPU even for fp32 logits (BENCHMARKS.md, training); on GPU, 1024-row chunks keep the
kernel count low, and fp32 logits use PyTorch's fused kernel, which keeps no more memory.

``linear_cross_entropy`` goes further for training (the model's default loss path): it takes the
output head's input and weight, makes the logits chunk by chunk and, in the same pass, the
gradients of the input and of the weight, so neither the logits nor their gradient ever exist
whole (BENCHMARKS.md, memory: the [tokens x vocab] pair was a third of the step's peak).
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

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
    fp32 copy of low-precision logits: chunked on CPU and for bf16/fp16 logits, else PyTorch's.

    Logits that are a DTensor sharded on the vocabulary (tensor parallelism, train/parallelize.py) go
    through PyTorch's vocabulary-parallel loss (``loss_parallel``: a max, a sum-exp and the target
    logit reduced over the shards, never the full rows); the result is the replicated plain scalar,
    whatever ``chunked`` says. Its backward must run under ``loss_parallel_context`` too."""
    if is_dtensor(logits):
        return _vocab_parallel_cross_entropy(logits, targets, ignore_index)
    if chunked is None:
        chunked = logits.device.type == "cpu" or logits.dtype not in (torch.float32, torch.float64)
    if chunked:
        return chunked_cross_entropy(logits, targets, ignore_index)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def is_dtensor(t) -> bool:
    """A DTensor (tensor parallelism, train/parallelize.py): the plain-tensor kernels here and in
    model.py step aside for the ops whose sharding rules DTensor knows. No tensor is one before
    ``torch.distributed.tensor`` is imported, which is left to the code that makes them (importing
    it costs every process about a second of start-up)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


_loss_parallel_depth = 0


@contextlib.contextmanager
def loss_parallel_context(enabled: bool):
    """``torch.distributed.tensor.parallel.loss_parallel`` when ``enabled`` (the forward and the
    backward of a vocabulary-sharded loss both run inside it), else a no-op. Re-entrant: torch's
    context removes its handlers on exit, so only the outermost one enters it (an inner exit would
    otherwise disable it before the outer backward)."""
    global _loss_parallel_depth
    if not enabled or _loss_parallel_depth:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    _loss_parallel_depth += 1
    try:
        with loss_parallel():
            yield
    finally:
        _loss_parallel_depth -= 1


def _vocab_parallel_cross_entropy(logits, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # fp32 over this rank's vocabulary shard only (1/tp of the rows' width); targets are the same on
    # every rank of the group.
    with loss_parallel_context(True):
        loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    # A DTensor (typed Tensor by F.cross_entropy), Replicate: every rank holds the full mean
    return cast("DTensor", loss).to_local()


# The fused head + loss on CPU (measured, BENCHMARKS.md): the head's matmuls over blocks of ~32 MiB
# of logits (262 rows of a 32k vocabulary in fp32, 524 for 2-byte inputs; the weight's gradient is read and
# written once per block, so 64-row blocks were slower), the softmax over cache-sized 64-row pieces.
CPU_FUSED_CHUNK_BYTES = 32 * 2**20
CPU_SOFTMAX_ROWS = 64


class _LinearCrossEntropy(torch.autograd.Function):
    """Output head and cross-entropy in one pass over row blocks: each block's logits are made,
    reduced to the loss terms and turned into that block's share of both gradients at once, then
    dropped. Saved for backward: the gradients (sizes of ``h`` and of ``weight``), never logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int, softmax_rows: int,
                need_h: bool, need_w: bool):
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 when given fp64
        n = h.shape[0]
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        count = valid.sum().clamp(min=1)
        target_logp = torch.empty(n, dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # The weight's gradient sums over every block: accumulate in fp32 (at least), cast once.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        scale = valid.to(acc) / count
        rows = torch.arange(min(softmax_rows, n), device=h.device)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            hc = h[start:end]
            # Logits in the inputs' dtype, as nn.Linear makes them (bf16-rounded as the unfused
            # path's are); each piece's softmax in fp32. d loss / d logits overwrites the logits
            # in place when they are already fp32.
            logits = hc @ weight.t()
            g = logits if logits.dtype == acc else torch.empty_like(logits)
            for a in range(start, end, softmax_rows):
                b = min(a + softmax_rows, end)
                logp = torch.log_softmax(logits[a - start:b - start], dim=-1, dtype=acc)
                tc = safe_targets[a:b]
                target_logp[a:b] = logp.gather(1, tc[:, None]).squeeze(1)
                if not (need_h or need_w):
                    continue
                probs = logp.exp_()
                probs[rows[:b - a], tc] -= 1.0
                torch.mul(probs, scale[a:b, None], out=g[a - start:b - start])
            if grad_h is not None:  # need_h
                torch.mm(g, weight, out=grad_h[start:end])
            if grad_w is not None:  # need_w
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), hc)
                else:  # bf16 product (fp32 accumulate inside the matmul), summed over blocks in fp32
                    grad_w += g.t() @ hc
        loss = -torch.where(valid, target_logp, 0.0).sum() / count
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        # Not in place, though that would spare one weight-sized transient: a graph kept with
        # retain_graph=True (gradcheck, double backward) must find the saved pieces unscaled.
        grad_h = None if grad_h is None else grad_h * grad_loss
        grad_w = None if grad_w is None else grad_w * grad_loss
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` ([N, d] x [V, d] -> logits [N, V]) against ``targets``
    [N], computed in fp32 (at least) without keeping (or recomputing) any [N, V] tensor: the forward
    also computes the gradients of ``h`` and ``weight`` chunk by chunk and keeps only those
    (backward scales them by the incoming gradient). Equals ``F.linear`` + ``chunked_cross_entropy``
    within fp32 rounding; rows whose target is ``ignore_index`` count for nothing (all of them:
    loss 0). Without autograd (``no_grad``, or neither input requiring grad) only the loss is
    computed. Under autocast ``h`` and ``weight`` are cast to its dtype first, as ``nn.Linear``
    would (autograd carries the casts' backward). Plain tensors only: a DTensor output head (tensor
    parallelism) goes through the module and ``cross_entropy`` instead."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    if chunk_rows is None:
        chunk_rows = 1024 if h.is_cuda else max(
            CPU_SOFTMAX_ROWS, CPU_FUSED_CHUNK_BYTES // (weight.shape[0] * weight.element_size()))
    softmax_rows = chunk_rows if h.is_cuda else min(chunk_rows, CPU_SOFTMAX_ROWS)
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and h.requires_grad, grad and weight.requires_grad
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows, softmax_rows,
                                         need_h, need_w)

