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
fp32 log-softmax when e = 4, and the loss's logsumexp); at the start of backward the logits' gradient (``e V`` per token) and
about three fp32 softmax chunks of 2048 rows (``losses.py``) are live on top; with fp32 logits
PyTorch's cross-entropy instead holds the gradients of the log-softmax and of the logits
(``8 V`` per token). Under autocast each matmul casts the fp32 normed input itself, so wq, wk, wv
keep three ``e d`` copies and w1, w3 two. ``fused_attention=False`` adds the math kernel's
``e H T`` softmax probabilities per token (and k, v expanded to all heads): PyTorch falls back to
it on CUDA for fp32 inputs with GQA, as ``benchmarks/gpu_memory_check.py`` shows. RoPE, residual
adds and the embedding save nothing of size (RoPE tables are buffers). Attention is assumed
memory-efficient (flash / efficient SDPA: no T x T matrix). With activation checkpointing per
block, each block keeps only its input (r d per token) and one block's full set is live again
during its recomputation (after the head's backward). Under autocast with fp32 master weights the bf16 weight copies cached
for the forward (``e x`` matmul parameters) stay alive until backward uses them.

``total`` is the sum of the parts (weights + gradients + optimizer + activations), without
transients; it overstates the peak when model states dominate and understates it when the loss
over a large vocabulary does (the planner uses the larger of ``total`` and ``peak``). ``peak`` follows one steady-state step (gradients freed by ``zero_grad``): backward starts
with every activation, the head gradient and the loss transient live, and trades activations for
gradients block by block (linear, so the maximum is at either end); the optimizer step then holds
the gradients plus one parameter-sized temporary (foreach AdamW's sqrt of the second moment):

    peak = weights + optimizer + max(activations + transient + head gradient, gradients + temporary)

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


def block_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int,
                                     fused_attention: bool = True, seq_len: int | None = None) -> int:
    d, e, r = cfg.dim, act_bytes, residual_bytes
    q = cfg.n_heads * cfg.head_dim
    k = cfg.kv_heads * cfg.head_dim
    # Under autocast (r != e) every matmul casts the normed input itself: wq, wk, wv keep three
    # copies and w1, w3 two; without autocast they share the norm's output.
    attn_casts, ffn_casts = (3, 2) if r != e else (1, 1)
    norm = 4 * d + 4 + r * d
    attention = norm + attn_casts * e * d + e * (q + 2 * k) + e * q + 4 * cfg.n_heads
    if not fused_attention:  # math SDPA: softmax probabilities and k, v expanded to n_heads
        t = cfg.max_seq_len if seq_len is None else seq_len
        attention += e * cfg.n_heads * t + (2 * e * (q - k) if k != q else 0) - 4 * cfg.n_heads
    ffn = norm + ffn_casts * e * d + 4 * e * cfg.hidden_dim
    return attention + ffn


def head_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int) -> int:
    d = cfg.dim
    return 4 * d + 4 + residual_bytes * d + act_bytes * d + act_bytes * cfg.vocab_size + 4


def training_memory(cfg: ModelConfig, seq_len: int | None = None, micro_batch: int = 1,
                    world_size: int = 1, *, activation_checkpointing: bool = False,
                    param_dtype="fp32", compute_dtype="bf16", autocast: bool | None = None,
                    gathered_blocks: int = 2, fused_attention: bool = True) -> dict:
    """Bytes per GPU: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``.

    ``param_dtype`` is the dtype of the master weights, gradients and AdamW moments;
    ``compute_dtype`` that of matmul inputs and activations. ``autocast`` (default: on when the two
    differ and ``world_size == 1``) counts the autocast weight cache; with ``world_size > 1`` the
    FSDP mixed-precision gather buffers are counted under weights instead. Also returns
    ``peak`` (see the module docstring), ``activations_no_checkpointing`` /
    ``activations_checkpointing`` and ``transient`` (the loss gradient at the start of backward,
    in ``peak`` only).
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

    block = block_activation_bytes_per_token(cfg, e, r, fused_attention, seq) * tokens
    head = head_activation_bytes_per_token(cfg, e, r) * tokens
    inputs = cfg.n_layers * r * cfg.dim * tokens  # what checkpointed blocks keep
    if autocast and mixed:
        # Compute-dtype copies of matmul weights, cached by autocast and saved for backward
        # (inside checkpointed blocks they are recomputed, so only the head's stays).
        blocks_cache = cfg.n_layers * (counts.attention_per_layer + counts.ffn_per_layer) * e
        head += counts.output * e
    else:
        blocks_cache = 0
    full = cfg.n_layers * block + blocks_cache + head
    ckpt = inputs + block + head
    acts = ckpt if activation_checkpointing else full
    V = cfg.vocab_size
    if e == 4:  # PyTorch's cross-entropy: gradients of the log-softmax and of the logits
        transient = 2 * 4 * V * tokens
    else:       # losses.py: the logits' gradient and ~3 fp32 softmax chunks of 2048 rows
        transient = e * V * tokens + 3 * 4 * V * min(tokens, 2048)
    total = weights + gradients + optimizer + acts
    head_grad = counts.output * pb / world_size
    temporary = n * pb / world_size
    # Backward trades activations for gradients block by block: the peak is at one end (see above).
    start = (acts - block if activation_checkpointing else acts) + transient + head_grad
    end = gradients + (block if activation_checkpointing else 0)
    peak = weights + optimizer + max(start, end, gradients + temporary)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(acts), "total": int(total), "peak": int(peak),
            "activations_no_checkpointing": int(full), "activations_checkpointing": int(ckpt),
            "transient": int(transient), "tokens_per_gpu": tokens, "world_size": world_size,
            "param_dtype": str(param_dtype), "compute_dtype": str(compute_dtype),
            "activation_checkpointing": bool(activation_checkpointing)}
