"""Training memory per GPU by arithmetic: weights, gradients, AdamW state, activations.

Model states under FSDP full sharding (ZeRO-3) are divided by the world size:

- weights: ``P x param_bytes / world`` (the sharded master copy, fp32 by default), plus when the
  compute dtype differs (mixed precision) the unsharded compute-dtype copy of the blocks that are
  gathered at once (``gathered_blocks``, default 2: the running block and the prefetched one);
  with ``world_size == 1`` and no FSDP this copy is the autocast weight cache, counted in
  activations instead (``autocast=True``);
- gradients: ``P x grad_bytes / world`` (same dtype as the master weights);
- optimizer: AdamW's two moments, ``2 x P x state_bytes / world``, plus one 4-byte step counter per
  parameter tensor (``9 L + 3`` tensors), which ``torch.optim.AdamW`` keeps as a scalar tensor.

Activations (what autograd saves for backward), bytes per token per block, counted from the ops
in ``model.py`` (d = dim, q = heads x head dim, k = kv heads x head dim, f = FFN hidden, H heads;
e = activation dtype bytes, r = residual-stream dtype bytes, fp32 = 4):

    attention:  4d + 4 + r d + e d       RMSNorm (fp32 input, 1/rms, normed, output = matmul input)
              + e (q + 2k)               q, k, v after RoPE (saved by attention)
              + e q + 4 H                attention output (also wo's input: SDPA returns it in
                                         [B, T, H, D] layout, so the reshape is a view), logsumexp
    FFN:        4d + 4 + r d + e d       RMSNorm as above
              + 4 e f                    w1 x, silu(w1 x), w3 x, their product (input of w2)

The final norm and head add ``4d + 4 + r d + e d + e V + 4`` per token (V vocab: the logits, or the
fp32 log-softmax when e = 4, and the loss's logsumexp); the loss's gradient needs ``(4 + e) V``
transiently at the start of backward. RoPE, residual
adds and the embedding save nothing of size (RoPE tables are buffers). Attention is assumed
memory-efficient (flash / efficient SDPA: no T x T matrix). With activation checkpointing per
block, each block keeps only its input (r d per token) and one block's full set is live again
during its recomputation. Under autocast with fp32 master weights the bf16 weight copies cached
for the forward (``e x`` matmul parameters) stay alive until backward uses them.

Everything is per GPU for ``micro_batch`` sequences of ``seq_len`` tokens. Allocator
fragmentation, CUDA context (~0.5 GiB, not seen by ``max_memory_allocated``), NCCL buffers and
optimizer temporaries are not modelled.
"""

from __future__ import annotations

from ..config import ModelConfig
from .flops import param_counts

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def dtype_bytes(dtype) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def param_tensor_count(cfg: ModelConfig) -> int:
    """Parameter tensors in ``Transformer``: 9 per block, embedding, final norm, output head."""
    return 9 * cfg.n_layers + 3


def block_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int) -> int:
    d, e, r = cfg.dim, act_bytes, residual_bytes
    q = cfg.n_heads * cfg.head_dim
    k = cfg.kv_heads * cfg.head_dim
    norm = 4 * d + 4 + r * d + e * d
    attention = norm + e * (q + 2 * k) + e * q + 4 * cfg.n_heads
    ffn = norm + 4 * e * cfg.hidden_dim
    return attention + ffn


def head_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int) -> int:
    d = cfg.dim
    return 4 * d + 4 + residual_bytes * d + act_bytes * d + act_bytes * cfg.vocab_size + 4


def training_memory(cfg: ModelConfig, seq_len: int | None = None, micro_batch: int = 1,
                    world_size: int = 1, *, activation_checkpointing: bool = False,
                    param_dtype="fp32", compute_dtype="bf16", autocast: bool | None = None,
                    gathered_blocks: int = 2) -> dict:
    """Bytes per GPU: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``.

    ``param_dtype`` is the dtype of the master weights, gradients and AdamW moments;
    ``compute_dtype`` that of matmul inputs and activations. ``autocast`` (default: on when the two
    differ and ``world_size == 1``) counts the autocast weight cache; with ``world_size > 1`` the
    FSDP mixed-precision gather buffers are counted under weights instead. Also returns
    ``activations_no_checkpointing`` / ``activations_checkpointing`` and ``transient`` (the loss
    gradient's peak at the start of backward, not in ``total``).
    """
    if world_size < 1 or micro_batch < 1:
        raise ValueError("world_size and micro_batch must be >= 1")
    seq = cfg.max_seq_len if seq_len is None else seq_len
    tokens = micro_batch * seq
    pb, e = dtype_bytes(param_dtype), dtype_bytes(compute_dtype)
    mixed = pb != e
    if autocast is None:
        autocast = mixed and world_size == 1
    r = pb if autocast else e  # autocast keeps the embedding and residual stream in fp32
    counts = param_counts(cfg)
    n = counts.total

    weights = n * pb / world_size
    if mixed and not autocast:
        weights += min(gathered_blocks, cfg.n_layers) * counts.per_layer * e
    gradients = n * pb / world_size
    optimizer = 2 * n * pb / world_size + 4 * param_tensor_count(cfg)

    block = block_activation_bytes_per_token(cfg, e, r) * tokens
    head = head_activation_bytes_per_token(cfg, e, r) * tokens
    full = cfg.n_layers * block + head
    ckpt = cfg.n_layers * r * cfg.dim * tokens + block + head
    acts = ckpt if activation_checkpointing else full
    if autocast and mixed:
        # bf16 copies of every matmul weight, cached by autocast and saved for backward.
        matmul = cfg.n_layers * (counts.attention_per_layer + counts.ffn_per_layer) + counts.output
        acts += matmul * e
    transient = (4 + e) * cfg.vocab_size * tokens
    total = weights + gradients + optimizer + acts
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(acts), "total": int(total),
            "activations_no_checkpointing": int(full), "activations_checkpointing": int(ckpt),
            "transient": int(transient), "tokens_per_gpu": tokens, "world_size": world_size,
            "param_dtype": str(param_dtype), "compute_dtype": str(compute_dtype),
            "activation_checkpointing": bool(activation_checkpointing)}
