"""The Llama 2 transformer in plain PyTorch.

Pre-norm decoder blocks: RMSNorm -> causal self-attention (RoPE, grouped-query attention through
``scaled_dot_product_attention``) -> residual; RMSNorm -> SwiGLU feed-forward -> residual; a final
RMSNorm and an output head, untied as in the paper or tied to the embedding
(``ModelConfig.tie_embeddings``: one Parameter under both names). Parameter names are Meta's
(``tok_embeddings``, ``layers.N.attention.wq``, ...), and RoPE rotates interleaved pairs as Meta's
reference does, so Meta checkpoints load as they are; the Hugging Face layout is handled in
``interop/hf.py``.

One forward serves training and inference: ``model(tokens, targets)`` runs SDPA's causal kernel
with no mask tensor, while generation and evaluation add per-row ``positions``, a padding ``mask``
and a ``KVCache`` (``generate.py``, ``eval/harness.py``).

Parallelism, compilation, activation checkpointing and mixed precision are applied from outside
(``train/parallelize.py``); nothing here knows about them, except that DTensor inputs (sequence
parallelism) take the plain-ops RMSNorm and SwiGLU instead of the autograd Functions below.

Lean backward: RMSNorm keeps only its input and the fp32 reciprocal RMS (``_RMSNormFn``), SwiGLU
keeps w1 x and w3 x and recomputes the SiLU (``_SwiGLUFn``), RoPE keeps only its tables. The
results are those of the plain ops (same forward kernels; ``tests/test_kernels.py``); the bytes
autograd keeps are counted in ``compute/memory.py``.

Initialisation (for pretraining from scratch): every linear and embedding weight is drawn from a
normal distribution with std 0.02 (GPT-2/Megatron convention); the two projections that write into
the residual stream (``attention.wo`` and ``feed_forward.w2``) use std 0.02 / sqrt(2 * n_layers), so
the residual stream's variance does not grow with depth; RMSNorm weights start at 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .losses import cross_entropy, is_dtensor, linear_cross_entropy

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in plain ops (what autograd would save: fp32 input, 1/rms, normed); the DTensor path
    and the reference the fused Function is tested against."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


class _RMSNormFn(torch.autograd.Function):
    """``rms_norm_reference`` saving only its input and the fp32 reciprocal RMS per row: the
    normalised rows are recomputed in backward (one cheap element-wise pass)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype
        normed = x.to(acc) * rstd  # recomputed: the forward's normalised rows, fp32
        # grad * normed is both the weight's gradient (summed over rows) and, times the weight, what
        # d/dx needs: rstd * (g - normed * mean(g * normed)) with g = grad * weight in fp32.
        prod = grad * normed.type_as(x)  # the forward scaled the input-dtype rows
        grad_weight = prod.flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(acc)
            if x.dtype == weight.dtype == prod.dtype == acc:  # fp32 throughout: row sums as one GEMV
                dot = (prod @ weight).unsqueeze(-1)
            else:
                dot = (g * normed).sum(-1, keepdim=True)
            dot = dot.div_(x.shape[-1])
            grad_x = torch.addcmul(g, normed, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (at least) for stability under bf16, then scale in the input dtype (as Meta does).
        if is_dtensor(x) or is_dtensor(self.weight):
            return rms_norm_reference(x, self.weight, self.eps)
        return _RMSNormFn.apply(x, self.weight, self.eps)


def _theta_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_frequencies(cfg: ModelConfig, scaled: bool = True) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim/2] in fp32, with the config's scaling (unless not
    ``scaled``).

    ``llama3`` (Llama 3.1): a wavelength (2 pi / frequency) longer than the original context over
    the low-frequency factor is divided by the factor, one shorter than the original context over
    the high-frequency factor is kept, and one between is a blend, linear in original context /
    wavelength; the same fp32 operations as transformers' ``_compute_llama3_parameters``."""
    inv_freq = _theta_frequencies(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling is None or not scaled:
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    stretched = wavelen > context / low
    divided = torch.where(stretched, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * divided / factor + smooth * divided
    between = ~(wavelen < context / high) * ~stretched
    return torch.where(between, blended, divided)


def rope_cos_sin(head_dim: int, end: int, theta: float,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [end, head_dim/2] for rotary embeddings, in fp32, for the frequencies
    ``inv_freq`` (``rope_frequencies``; default: theta's, unscaled)."""
    if inv_freq is None:
        inv_freq = _theta_frequencies(head_dim, theta)
    angles = torch.outer(torch.arange(end, dtype=torch.int64).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by position.

    cos/sin are [T, D/2] (every row at the same positions) or [B, T, D/2] (positions per row).

    In fp32 at least; fp32 inputs are not copied, and autograd saves only the small tables, never x.
    Eager: each pair is a complex number times e^(i angle), one kernel forward and one (by the
    conjugate) backward, where the real-valued form below takes seven strided passes. Under
    torch.compile the real-valued form, which Inductor fuses (it does not generate complex code)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)  # broadcast over heads
    pairs = x.to(dtype).unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs (re, im) adjacent
    if torch.compiler.is_compiling():
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


def attention_mask(T: int, past: int, pad: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Which keys each of T new queries may see: boolean [B or 1, 1, T, past + T], or None where
    causal attention needs no mask tensor (SDPA's ``is_causal``; a lone query sees every key).

    ``pad`` [B, past + T] marks real (non-pad) columns of a padded batch."""
    if pad is None and (past == 0 or T == 1):
        return None
    mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
    if pad is None:
        return mask
    mask = mask & pad.bool()[:, None, None, :]
    # A pad query still sees itself: an all-masked row would turn into NaN and spread.
    new = torch.arange(T, device=device)
    mask[:, :, new, past + new] = True
    return mask


class BlockKV:
    """One block's keys and values [B, n_kv_heads, capacity, head_dim]; ``length`` columns are filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0):
        self.k, self.v, self.length = k, v, length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new columns; the keys and values of every filled column."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:  # out of room: grow to fit
            self.k = torch.cat([self.k[:, :, :self.length], k], dim=2)
            self.v = torch.cat([self.v[:, :, :self.length], v], dim=2)
        else:
            self.k[:, :, self.length:end] = k
            self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of past columns for incremental decoding, one ``BlockKV`` per block, sized by
    n_kv_heads (not n_heads). All rows share the columns: a padded batch masks its pads."""

    def __init__(self, blocks: list[BlockKV]):
        self.blocks = blocks

    @property
    def length(self) -> int:
        return self.blocks[0].length

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given rows (repeats allowed: one context, several continuations)."""
        return KVCache([BlockKV(b.k[rows, :, :b.length], b.v[rows, :, :b.length], b.length)
                        for b in self.blocks])

    def nbytes(self) -> int:
        return sum(b.k.nbytes + b.v.nbytes for b in self.blocks)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: BlockKV | None = None) -> torch.Tensor:
        """``mask`` is ``attention_mask``'s: None means causal over ``x`` (a single query: every key)."""
        B, T, _ = x.shape
        # Head counts come from the projections' outputs: under tensor parallelism (train/parallelize.py)
        # each rank holds n_heads/tp query heads and n_kv_heads/tp KV heads, with the same GQA ratio.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is not None:
            k, v = cache.update(k, v)
        out = _sdpa(q, k, v, mask, mask is None and T > 1, q.shape[1] // k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def _sdpa(q, k, v, mask, is_causal: bool, groups: int) -> torch.Tensor:
    if groups > 1:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class _SwiGLUFn(torch.autograd.Function):
    """silu(a) * b saving only a and b: silu(a) is recomputed in backward. The same kernels as
    ``F.silu(a) * b`` under autograd (``silu_backward`` included), so results are bit-identical."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.aten.silu_backward(grad * b, a) if ctx.needs_input_grad[0] else None
        grad_b = grad * F.silu(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b; autograd keeps a and b only (plain ops for DTensor inputs)."""
    if is_dtensor(a) or is_dtensor(b):
        return F.silu(a) * b
    return _SwiGLUFn.apply(a, b)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


# RoPE table rows built up front: every training context here fits; longer ones grow on demand.
ROPE_START_ROWS = 4096


def _low_precision_on_cpu(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16/fp16 head matmuls on CPU (autocast or low-precision weights): there the fused head's
    fp32 sum of per-block weight gradients costs more than the logits it saves."""
    if h.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    return weight.dtype in (torch.bfloat16, torch.float16)


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    """A tied model's state dict holds the shared matrix once, as ``tok_embeddings.weight``."""
    state_dict.pop(prefix + "output.weight", None)


def _fill_tied_head(module, state_dict, prefix, *args):
    """Loading a tied model: the head is the embedding (it need not be in the state dict)."""
    if prefix + "tok_embeddings.weight" in state_dict:
        state_dict.setdefault(prefix + "output.weight", state_dict[prefix + "tok_embeddings.weight"])


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # On the meta device (a model about to be loaded or sharded) the embedding's own random init
        # is skipped: normal_ there imports torch._dynamo, a second of start-up; elsewhere it runs,
        # so seeded initialisations stay as they were.
        meta = torch.get_default_device().type == "meta"
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim,
                                           _weight=torch.empty(config.vocab_size, config.dim) if meta else None)
        # A ModuleDict keyed "0", "1", ... gives Meta's names (layers.N.*) and lets FSDP wrap blocks.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One Parameter under both names: one gradient (the sum of both uses), one optimizer
            # state, saved once as tok_embeddings.weight (the hooks below).
            self.output.weight = self.tok_embeddings.weight
            self._register_state_dict_hook(_drop_tied_head)
            self._register_load_state_dict_pre_hook(_fill_tied_head, with_module=True)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.output.weight.device.type != "meta":
            self.init_weights()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.config.tie_embeddings:  # to_empty() (from the meta device) makes a Parameter per name
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise for pretraining from scratch (see the module docstring)."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith("attention.wo") or name.endswith("feed_forward.w2")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_residual_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_rope()

    def init_rope(self, rows: int = ROPE_START_ROWS) -> None:
        """(Re)compute the RoPE tables in fp32 on the model's device (after ``to_empty`` or a dtype
        cast) for the first ``rows`` positions, at most max_seq_len: a table for a long context is
        grown by ``hidden_states`` when a sequence reaches that far, not allocated up front."""
        rows = min(max(rows, self.rope_cos.shape[0]), self.config.max_seq_len)
        inv_freq = rope_frequencies(self.config)
        cos, sin = rope_cos_sin(self.config.head_dim, rows, self.config.rope_theta, inv_freq)
        self.rope_cos = cos.to(self.output.weight.device)
        self.rope_sin = sin.to(self.output.weight.device)

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] (what the output head reads); see ``forward``."""
        T = tokens.shape[1]
        past = 0 if cache is None else cache.length
        if past + T > self.rope_cos.shape[0]:  # rows are the same at any table length: grow, once
            self.init_rope(max(past + T, 2 * self.rope_cos.shape[0]))
        if positions is not None:  # a padded batch may hold more columns than positions
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        elif past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        else:  # every row continues from the cache: a slice of the tables
            cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        attn = attention_mask(T, past, mask, tokens.device)  # once for all blocks
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, attn, None if cache is None else cache.blocks[i])
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                chunked_loss: bool | Literal["head"] | None = None):
        """Logits [B, T, vocab] for ``tokens`` [B, T]; with ``targets``, the mean cross-entropy.

        Positions whose target is -100 are ignored. The loss is computed in fp32 without keeping an
        fp32 copy of bf16 logits (see ``losses.py``); ``chunked_loss`` picks its kernel: ``"head"``,
        the output head fused with the loss (``linear_cross_entropy``: no logits are kept; the
        head's own module call, and so its hooks, are skipped, so a head with hooks or a DTensor
        weight - tensor parallelism - takes the module and the next choice); True, the head's
        logits then the chunked cross-entropy; False, PyTorch's; None (the default), the fused head
        except for low-precision compute on CPU, where the chunked loss over logits is faster
        (BENCHMARKS.md, memory), and otherwise the faster of the two others for the device and dtype.

        Inference: ``positions`` [B, T] are each token's RoPE position, below max_seq_len (default:
        the columns after the cache's, the same for every row); ``mask`` [B, cached + T] marks the
        real tokens of a padded batch; ``cache`` (from ``new_cache``) holds earlier columns and
        gains these; ``last_only`` computes the last position's logits alone. With none of them
        (training), attention is SDPA's causal kernel with no mask tensor.
        """
        h = self.hidden_states(tokens, positions, mask, cache)
        if last_only:  # the output head over a whole prompt is wasted when only its end is read
            h = h[:, -1:]
        head = self.output
        fuse = chunked_loss == "head" or (chunked_loss is None and not _low_precision_on_cpu(h, head.weight))
        if (targets is not None and fuse and not last_only and not is_dtensor(h)
                and not is_dtensor(head.weight) and not (head._forward_hooks or head._forward_pre_hooks)):
            return linear_cross_entropy(h.flatten(0, 1), head.weight, targets.flatten())
        logits = head(h)
        if targets is None:
            return logits
        return cross_entropy(logits.flatten(0, 1), targets.flatten(),
                             chunked=None if chunked_loss == "head" else chunked_loss)

    def new_cache(self, batch: int, max_len: int = 0, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows, allocated for ``max_len`` columns (it grows past them)."""
        param = self.output.weight
        shape = (batch, self.config.kv_heads, max_len, self.config.head_dim)

        def buf():
            return torch.zeros(shape, dtype=dtype or param.dtype, device=param.device)
        return KVCache([BlockKV(buf(), buf()) for _ in self.layers])

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n
