"""`llama-pretrain model info`: sizes, FLOPs and memory of a preset or config, without weights."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model shapes (parameter counts, FLOPs, memory)")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = msub.add_parser("info", help="parameters, FLOPs per token, KV cache and training memory",
                           description="Counts are computed by arithmetic; no weights are allocated.")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (llama2-7b, llama2-70b, llama1-65b, ...)")
    src.add_argument("--config", help="a model config: JSON (ours, HF config.json, Meta params.json) "
                                      "or a TOML run config with a [model] section")
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for FLOPs per token (default: the model's context)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def model_info(cfg, seq_len: int | None = None) -> dict:
    from ..compute.flops import flops_per_token, kv_cache_bytes_per_token, param_counts, training_state_bytes

    counts = param_counts(cfg)
    seq = seq_len or cfg.max_seq_len
    return {
        "config": cfg.to_dict(),
        "ffn_hidden_dim": cfg.hidden_dim,
        "head_dim": cfg.head_dim,
        "total_params": counts.total,
        "embedding_params": counts.embedding,
        "non_embedding_params": counts.non_embedding,
        "output_params": counts.output,
        "params_per_layer": counts.per_layer,
        "seq_len": seq,
        "flops_per_token": flops_per_token(cfg, seq),
        "flops_definition": "6*N_non_embedding + 12*L*H*Q*T (torchtitan)",
        "kv_cache_bytes_per_token": {"bf16": kv_cache_bytes_per_token(cfg, 2),
                                     "fp32": kv_cache_bytes_per_token(cfg, 4)},
        "training_state_bytes": training_state_bytes(cfg),
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}E{unit}"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def run_info(args) -> int:
    from ..config import ModelConfig
    from ..errors import UserError

    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {args.seq_len}")
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset)
    else:  # imported here: the interop package imports torch, which --preset does not need
        from ..interop.config_files import model_config_from_file
        cfg = model_config_from_file(args.config)
    info = model_info(cfg, args.seq_len)
    if args.json:
        info["preset"] = args.preset
        print(json.dumps(info, indent=2))
        return 0
    name = args.preset or args.config
    gqa = f"GQA {cfg.n_heads}/{cfg.kv_heads}" if cfg.kv_heads != cfg.n_heads else "no GQA"
    rows = [
        ("model", name),
        ("shape", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({gqa}), "
                  f"FFN {cfg.hidden_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}"),
        ("parameters", f"{info['total_params']:,} ({_human(info['total_params'])})"),
        ("  embedding", f"{info['embedding_params']:,}"),
        ("  non-embedding", f"{info['non_embedding_params']:,}"),
        ("FLOPs/token", f"{info['flops_per_token']:,} ({_human(info['flops_per_token'])}) at "
                        f"seq {info['seq_len']}; {info['flops_definition']}"),
        ("KV cache/token", f"{info['kv_cache_bytes_per_token']['bf16']:,} B bf16"),
        ("peak LR", f"{cfg.peak_lr:g}"),
    ]
    for dtype, parts in info["training_state_bytes"].items():
        rows.append((f"memory {dtype}", ", ".join(f"{k} {_gib(v)}" for k, v in parts.items())))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
