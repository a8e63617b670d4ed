"""Parameter counts and FLOPs by arithmetic (no weights are allocated).

FLOPs per trained token follow torchtitan's definition, used wherever MFU is printed:
    6 * N_non_embedding + 12 * L * H * Q * T
with N_non_embedding the parameters less the input embedding table (the output head is counted,
also when it is tied to the embedding: its matmul is done all the same),
L layers, H heads, Q head dim and T the sequence length (attention without causal sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    output: int
    per_layer: int
    attention_per_layer: int
    ffn_per_layer: int
    tied: bool = False  # the head is the embedding's matrix: counted in ``total`` once

    @property
    def non_embedding(self) -> int:
        """The parameters less the input embedding, the head's matrix counted (FLOPs' N)."""
        return self.total - self.embedding + (self.output if self.tied else 0)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    q_width = cfg.n_heads * cfg.head_dim
    kv_width = cfg.kv_heads * cfg.head_dim
    attention = cfg.dim * q_width + 2 * cfg.dim * kv_width + q_width * cfg.dim
    ffn = 3 * cfg.dim * cfg.hidden_dim
    per_layer = attention + ffn + 2 * cfg.dim  # two RMSNorm weights
    embedding = cfg.vocab_size * cfg.dim
    output = cfg.vocab_size * cfg.dim
    total = embedding + cfg.n_layers * per_layer + cfg.dim + (0 if cfg.tie_embeddings else output)
    return ParamCounts(total, embedding, output, per_layer, attention, ffn, cfg.tie_embeddings)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at ``seq_len`` (default: the context)."""
    t = cfg.max_seq_len if seq_len is None else seq_len
    return 6 * param_counts(cfg).non_embedding + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * t


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Keys and values of one position across all layers (n_kv_heads wide)."""
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * bytes_per_value


def training_state_bytes(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Bytes of weights, gradients and AdamW state (two moments) in bf16 and fp32."""
    n = param_counts(cfg).total
    return {
        dtype: {"weights": n * size, "gradients": n * size, "adamw_state": 2 * n * size}
        for dtype, size in (("bf16", 2), ("fp32", 4))
    }
