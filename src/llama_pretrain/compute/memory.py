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

    attention:  r d + 4 + e d            RMSNorm (its input, fp32 1/rms; output = matmul input)
              + e (q + 2k)               q, k, v after RoPE (saved by attention)
              + e q + 4 H                attention output (also wo's input: SDPA returns it in
                                         [B, T, H, D] layout, so the reshape is a view), logsumexp
    FFN:        r d + 4 + e d            RMSNorm as above
              + 3 e f                    w1 x, w3 x (SwiGLU recomputes silu), their product (w2's input)

Selective checkpointing (``activation_checkpointing="selective"``) keeps per block its input and
the outputs of the matmuls and attention: ``r d + e (q + 2k) + e q + 4 H + e d + 2 e f + e d``
(wq, wk, wv; attention; wo; w1, w3; w2), and recomputes the norms, RoPE and SwiGLU's product.

The final norm and the output head fused with the loss (``fused_loss``, the trainer's default
without tensor parallelism: ``losses.linear_cross_entropy``) add ``r d + 4 + e d`` per token (the
norm as above; the gradient of its output, computed in the forward) and the head's gradient, ``e``
bytes per head parameter, also computed in the forward; no logits are kept, and the backward's
transient is only its scaled copy of the ``e d`` piece (the scaled head gradient is the one counted
below). Without fusion (``fused_loss=False``; always with ``tp`` > 1) the head adds
``r d + 4 + e d + e V + 4`` per token (V vocab: the logits, or the
fp32 log-softmax when e = 4, and the loss's logsumexp); at the start of backward the logits'
gradient (``e V`` per token) and about three fp32 softmax chunks of 2048 rows (``losses.py``) are
live on top; with fp32 logits PyTorch's cross-entropy instead holds the gradients of the log-softmax and of the logits
(``8 V`` per token). Under autocast each matmul casts the fp32 normed input itself, so wq, wk, wv
keep three ``e d`` copies and w1, w3 two. ``fused_attention=False`` adds the math kernel's
``e H T`` softmax probabilities per token (and k, v expanded to all heads): PyTorch falls back to
it on CUDA for fp32 inputs with GQA, as ``benchmarks/gpu_memory_check.py`` shows. RoPE, residual
adds and the embedding save nothing of size (RoPE tables are buffers). Attention is assumed
memory-efficient (flash / efficient SDPA: no T x T matrix). With activation checkpointing per
block, each block keeps only its input (r d per token) and one block's full set is live again
during its recomputation (after the head's backward). Under autocast with fp32 master weights the
bf16 weight copies cached for the forward (``e x`` matmul parameters) stay alive until backward uses them.

``total`` is the sum of the parts (weights + gradients + optimizer + activations), without
transients; it overstates the peak when model states dominate and understates it when the loss
over a large vocabulary does (the planner uses the larger of ``total`` and ``peak``). ``peak``
follows one steady-state step (gradients freed by ``zero_grad``): backward starts
with every activation, the head gradient and the loss transient live, and trades activations for
gradients block by block (linear, so the maximum is at either end); the optimizer step then holds
the gradients plus one parameter-sized temporary (foreach AdamW's sqrt of the second moment):

    peak = weights + optimizer + max(activations + transient + head gradient, gradients + temporary)

Everything is per GPU for ``micro_batch`` sequences of ``seq_len`` tokens. Allocator
fragmentation, CUDA context (~0.5 GiB, not seen by ``max_memory_allocated``), NCCL buffers and
optimizer temporaries are not modelled.

Tensor parallelism (``tp`` > 1, dp = world / tp; the trainer's layout in ``train/parallelize.py``):
every matrix is split over the tp ranks of a node (``wq wk wv w1 w3`` by output features,
``wo w2`` by input features, embedding and head by vocabulary) and FSDP shards the local pieces
over dp, so model states are ``P_tp / dp`` with ``P_tp = (P - norms) / tp + norms``: the RMSNorm
weights ((2L + 1) d) are replicated over tp. Activations with sequence parallelism: the residual
stream and the norms hold T/tp positions, and q, k, v, the attention output, the logsumexp, the
FFN's hidden activations and the logits are split by heads / hidden / vocabulary, so everything
is divided by tp except what DTensor all-gathers and the matmuls save whole: the normed input of
attention and of the FFN (``2 e d`` per token per block) and of the head (``e d``), plus the
loss's per-token logsumexp (4 bytes; ``loss_parallel`` reduces it over the vocabulary shards).
(Megatron-LM instead saves the sequence shard and gathers it again in backward; DTensor does
not.) Checkpointed block inputs are sequence shards (``/ tp``); the loss transient is
vocabulary-sharded (``/ tp``). Autocast is not combined with tp (FSDP2 mixed precision).
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


CHECKPOINT_MODES = ("none", "full", "selective")


def checkpoint_mode(value) -> str:
    """``parallel.activation_checkpointing`` as one of CHECKPOINT_MODES (True: full, False: none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINT_MODES)}, got {value!r}")
    return value


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
    norm = r * d + 4  # the fused RMSNorm keeps its input and 1/rms; its output is the matmuls'
    attention = norm + attn_casts * e * d + e * (q + 2 * k) + e * q + 4 * cfg.n_heads
    if not fused_attention:  # math SDPA: softmax probabilities and k, v expanded to n_heads
        t = cfg.max_seq_len if seq_len is None else seq_len
        attention += e * cfg.n_heads * t + (2 * e * (q - k) if k != q else 0) - 4 * cfg.n_heads
    ffn = norm + ffn_casts * e * d + 3 * e * cfg.hidden_dim
    return attention + ffn


def selective_block_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int) -> int:
    """What selective checkpointing keeps per token per block (module docstring)."""
    d, e = cfg.dim, act_bytes
    q, k = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return residual_bytes * d + e * (q + 2 * k) + e * q + 4 * cfg.n_heads + 2 * e * d + 2 * e * cfg.hidden_dim


def head_activation_bytes_per_token(cfg: ModelConfig, act_bytes: int, residual_bytes: int,
                                    fused: bool = False) -> int:
    """The final norm and the head per token; ``fused``: the head fused with the loss (no logits,
    no logsumexp; the head's own gradient, not per token, is added by ``training_memory``)."""
    d = cfg.dim
    if fused:
        return residual_bytes * d + 4 + act_bytes * d
    return residual_bytes * d + 4 + act_bytes * d + act_bytes * cfg.vocab_size + 4


def _check_layout(world_size: int, micro_batch: int, tp: int) -> None:
    if world_size < 1 or micro_batch < 1:
        raise ValueError("world_size and micro_batch must be >= 1")
    if tp < 1 or world_size % tp:
        raise ValueError(f"tp ({tp}) must be >= 1 and divide world_size ({world_size})")


def _activation_bytes(cfg: ModelConfig, tokens: int, seq: int, e: int, r: int, tp: int, *, fused: bool,
                      fused_attention: bool, autocast_cache: bool) -> dict:
    """Activation bytes per GPU under each checkpointing mode ("none", "full", "selective"), and the
    ``block`` and ``head`` parts the peak is made of."""
    if fused and tp > 1:
        raise ValueError("under tensor parallelism the output head is not fused with the loss")
    counts = param_counts(cfg)
    block = block_activation_bytes_per_token(cfg, e, r, fused_attention, seq) * tokens
    head = head_activation_bytes_per_token(cfg, e, r, fused) * tokens
    if fused:  # the head's gradient, made in the forward (in the compute dtype, as the weight is used)
        head += counts.output * e
    inputs = cfg.n_layers * r * cfg.dim * tokens  # what checkpointed blocks keep
    blocks_cache = 0
    if autocast_cache:
        # Compute-dtype copies of matmul weights, cached by autocast and saved for backward
        # (inside checkpointed blocks they are recomputed, so only the head's stays).
        blocks_cache = cfg.n_layers * (counts.attention_per_layer + counts.ffn_per_layer) * e
        if not fused:  # the fused loss casts the head's weight itself and does not keep the copy
            head += counts.output * e
    if tp > 1:  # sequence parallelism (module docstring)
        block, head, inputs = tensor_parallel_activations(cfg, e, tokens, tp, block, head, inputs)
    # Selective: every block keeps its matmul and attention outputs; one block's full set is live
    # again while it is recomputed (sharded like the rest under tensor parallelism, roughly / tp).
    selective = cfg.n_layers * selective_block_bytes_per_token(cfg, e, r) * tokens / tp + block + head
    return {"none": cfg.n_layers * block + blocks_cache + head, "full": inputs + block + head,
            "selective": selective, "block": block, "head": head}


def _transient_bytes(cfg: ModelConfig, tokens: int, e: int, tp: int, fused: bool) -> float:
    """The loss gradient alive at the start of backward (in ``peak`` only)."""
    V = cfg.vocab_size
    if fused:  # backward scales the saved gradients: the head's is head_grad below, plus h's
        transient = e * cfg.dim * tokens
    elif e == 4:  # PyTorch's cross-entropy: gradients of the log-softmax and of the logits
        transient = 2 * 4 * V * tokens
    else:       # losses.py: the logits' gradient and ~3 fp32 softmax chunks of 2048 rows
        transient = e * V * tokens + 3 * 4 * V * min(tokens, 2048)
    return transient / tp  # the logits and their gradient are vocabulary shards under tensor parallelism


def training_memory(cfg: ModelConfig, seq_len: int | None = None, micro_batch: int = 1,
                    world_size: int = 1, *, activation_checkpointing: bool | str = False,
                    param_dtype="fp32", compute_dtype="bf16", autocast: bool | None = None,
                    gathered_blocks: int = 2, fused_attention: bool = True, tp: int = 1,
                    fused_loss: bool | None = None) -> dict:
    """Bytes per GPU: ``weights``, ``gradients``, ``optimizer``, ``activations``, ``total``.

    ``param_dtype`` is the dtype of the master weights, gradients and AdamW moments;
    ``compute_dtype`` that of matmul inputs and activations. ``autocast`` (default: on when the two
    differ and ``world_size == 1``) counts the autocast weight cache; with ``world_size > 1`` the
    FSDP mixed-precision gather buffers are counted under weights instead. Also returns
    ``peak`` (see the module docstring), ``activations_no_checkpointing`` /
    ``activations_checkpointing`` and ``transient`` (the loss gradient at the start of backward,
    in ``peak`` only). ``activation_checkpointing`` is a ``checkpoint_mode``: none/False,
    full/True or selective; ``activations_selective`` is the last. ``tp`` is the
    tensor-parallel degree (``world_size`` GPUs = dp x tp; see the module docstring); ``tp=1`` is
    plain FSDP over ``world_size``. ``fused_loss`` (default: on
    when ``tp == 1``, as in the trainer) models the output head fused with the loss.
    """
    _check_layout(world_size, micro_batch, tp)
    mode = checkpoint_mode(activation_checkpointing)
    checkpointed = mode != "none"
    dp = world_size // tp  # FSDP shards each tensor-parallel rank's pieces over dp
    seq = cfg.max_seq_len if seq_len is None else seq_len
    tokens = micro_batch * seq
    pb, e = dtype_bytes(param_dtype), dtype_bytes(compute_dtype)
    mixed = pb != e
    if autocast is None:
        autocast = mixed and world_size == 1
    if autocast and tp > 1:
        raise ValueError("tensor parallelism uses FSDP2 mixed precision, not autocast")
    r = pb if autocast else e  # autocast keeps the embedding and residual stream in fp32
    counts = param_counts(cfg)
    n = tp_local_params(cfg, tp)  # what one tensor-parallel rank holds: counts.total at tp 1

    weights = n * pb / dp
    if mixed and not autocast:  # FSDP's mixed-precision gather buffers
        weights += min(gathered_blocks, cfg.n_layers) * tp_local_layer_params(cfg, tp) * e
    gradients = n * pb / dp
    optimizer = 2 * n * pb / dp + 4 * param_tensor_count(cfg)
    fused = tp == 1 if fused_loss is None else fused_loss
    act = _activation_bytes(cfg, tokens, seq, e, r, tp, fused=fused, fused_attention=fused_attention,
                            autocast_cache=autocast and mixed)
    block, acts = act["block"], act[mode]
    transient = _transient_bytes(cfg, tokens, e, tp, fused)
    total = weights + gradients + optimizer + acts
    head_grad = counts.output * pb / world_size
    temporary = n * pb / dp
    # Backward trades activations for gradients block by block: the peak is at one end (see above).
    start = (acts - block if checkpointed else acts) + transient + head_grad
    end = gradients + (block if checkpointed else 0)
    peak = weights + optimizer + max(start, end, gradients + temporary)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(acts), "total": int(total), "peak": int(peak),
            "activations_no_checkpointing": int(act["none"]), "activations_checkpointing": int(act["full"]),
            "activations_selective": int(act["selective"]), "checkpointing_mode": mode,
            "transient": int(transient), "tokens_per_gpu": tokens, "world_size": world_size,
            "tp": tp, "dp": dp,
            "param_dtype": str(param_dtype), "compute_dtype": str(compute_dtype),
            "activation_checkpointing": checkpointed}


def _norm_params(cfg: ModelConfig) -> int:
    return (2 * cfg.n_layers + 1) * cfg.dim  # two RMSNorms per block and the final one


def tp_local_params(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters one tensor-parallel rank holds: the matrices split over ``tp``, the norms whole."""
    sharded = param_counts(cfg).total - _norm_params(cfg)
    return -(-sharded // tp) + _norm_params(cfg)


def tp_local_layer_params(cfg: ModelConfig, tp: int = 1) -> int:
    """One block's parameters on one tensor-parallel rank (its two norm weights whole)."""
    sharded = param_counts(cfg).per_layer - 2 * cfg.dim
    return -(-sharded // tp) + 2 * cfg.dim


def tensor_parallel_activations(cfg: ModelConfig, act_bytes: int, tokens: int, tp: int,
                                block: float, head: float, inputs: float):
    """Per-rank activation bytes under tensor + sequence parallelism from the ``tp=1`` figures
    (one block, the head, the checkpointed inputs): all divided by ``tp`` except the all-gathered
    matmul inputs and the logsumexp (module docstring)."""
    gathered = act_bytes * cfg.dim * tokens  # one all-gathered [tokens, dim] matmul input
    block = (block - 2 * gathered) / tp + 2 * gathered
    head = (head - gathered - 4 * tokens) / tp + gathered + 4 * tokens
    return block, head, inputs / tp
