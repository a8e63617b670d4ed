"""`llama-pretrain ladder`: Figure 5 as a command, a family of model sizes on the same data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ladder", help="Figure 5: train a ladder of model sizes on the same tokens",
                       description="Trains each size of a ladder (an ordinary run dir DIR/<size>, resumable; "
                                   "finished ones are reused) on the same shards for the same tokens, with a "
                                   "peak LR of lr_ref * dim_ref / dim, then writes DIR/figure5.png and "
                                   "DIR/ladder.json. Without --config: the built-in CPU ladder (4 sizes, "
                                   "widths 16-128) on the demo's corpus, ~6 minutes on 2 cores.")
    p.add_argument("--config", help="ladder TOML (a run config plus [ladder] sizes; e.g. configs/ladder-gpu.toml)")
    p.add_argument("--run-dir", default="runs/ladder", help="ladder directory (default runs/ladder)")
    p.add_argument("--sizes", help="comma-separated size names to train (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..train.ladder import load_ladder, run_ladder

    run_dir = Path(args.run_dir)
    ladder = load_ladder(args.config, run_dir, args.sizes)
    out = run_ladder(ladder, run_dir, say=lambda m: print(m, file=sys.stderr, flush=True))
    if not out:  # a torchrun rank other than 0
        return 0
    print(f"{'size':<8} {'params':>10} {'non-emb':>10} {'tokens':>11} {'peak lr':>8} {'train':>7} {'val':>7}")
    for r in out["runs"]:
        val = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.3f}"
        print(f"{r['name']:<8} {r['params']:>10,} {r['non_embedding_params']:>10,} {r['tokens']:>11,} "
              f"{r['peak_lr']:>8.2g} {r['final_train_loss']:>7.3f} {val:>7}")
    print(f"wrote {run_dir / 'ladder.json'} and {out['figure']} ({out['wall_s']:.0f} s)")
    return 0
