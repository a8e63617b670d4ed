"""The Llama 2 transformer in plain PyTorch.

Pre-norm decoder blocks: RMSNorm -> causal self-attention (RoPE, grouped-query attention through
``scaled_dot_product_attention``) -> residual; RMSNorm -> SwiGLU feed-forward -> residual; a final
RMSNorm and an untied output head. Parameter names are Meta's (``tok_embeddings``,
``layers.N.attention.wq``, ...), and RoPE rotates interleaved pairs as Meta's reference does, so
Meta checkpoints load as they are; the Hugging Face layout is handled in ``interop/hf.py``.

Parallelism, compilation, activation checkpointing and mixed precision are applied from outside
(``train/parallel.py``); nothing here knows about them.

Initialisation (for pretraining from scratch): every linear and embedding weight is drawn from a
normal distribution with std 0.02 (GPT-2/Megatron convention); the two projections that write into
the residual stream (``attention.wo`` and ``feed_forward.w2``) use std 0.02 / sqrt(2 * n_layers), so
the residual stream's variance does not grow with depth; RMSNorm weights start at 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .losses import cross_entropy

_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (at least) for stability under bf16, then scale in the input dtype (as Meta does).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cos_sin(head_dim: int, end: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [end, head_dim/2] for rotary embeddings, in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.int64).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by position; cos/sin [T, D/2]."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions for one block, sized by n_kv_heads (not n_heads)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


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
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]

        mask = None
        is_causal = T > 1
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
            if start_pos > 0 and T > 1:
                # New queries see every cached position plus the causal part of the new chunk.
                total = start_pos + T
                mask = torch.ones(T, total, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                is_causal = False
        out = _sdpa(q, k, v, mask, is_causal, self.n_heads // self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def _sdpa(q, k, v, mask, is_causal: bool, groups: int) -> torch.Tensor:
    if groups > 1:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        # A ModuleDict keyed "0", "1", ... gives Meta's names (layers.N.*) and lets FSDP wrap blocks.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.output.weight.device.type != "meta":
            self.init_weights()

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

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables in fp32 on the model's device (after ``to_empty`` or a dtype cast)."""
        device = self.output.weight.device
        cos, sin = rope_cos_sin(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] (what the output head reads)."""
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}"
            )
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, start_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0):
        """Logits [B, T, vocab] for ``tokens`` [B, T]; with ``targets``, the mean cross-entropy.

        Positions whose target is -100 are ignored. The loss is computed in fp32 without keeping an
        fp32 copy of bf16 logits (see ``losses.py``).
        """
        h = self.hidden_states(tokens, start_pos)
        logits = self.output(h)
        if targets is None:
            return logits
        return cross_entropy(logits.flatten(0, 1), targets.flatten())

    # -- inference helpers ---------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate a KV cache per block (n_kv_heads wide) for incremental decoding."""
        max_len = max_len or self.config.max_seq_len
        param = self.output.weight
        for layer in self.layers.values():
            layer.attention.cache = KVCache(batch, max_len, self.config.kv_heads, self.config.head_dim,
                                            dtype or param.dtype, param.device)

    def clear_cache(self) -> None:
        for layer in self.layers.values():
            layer.attention.cache = None

    def kv_cache_bytes(self) -> int:
        total = 0
        for layer in self.layers.values():
            cache = layer.attention.cache
            if cache is not None:
                total += cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
        return total

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n
