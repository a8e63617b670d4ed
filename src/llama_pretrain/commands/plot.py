"""`llama-pretrain plot`: the paper's Figure 5 (train perplexity vs processed tokens) for run dirs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="Figure 5: training perplexity vs processed tokens for run dirs",
                       description="Draws the training perplexity of each run (from RUN_DIR/metrics.jsonl) "
                                   "against the tokens it has processed, one line per run, labelled by "
                                   "model preset and size, as in Figure 5 of the Llama 2 paper.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", required=True, help="output image (PNG, or .pdf/.svg)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in logged steps (default 1)")
    p.add_argument("--metric", help="draw this logged metric instead (e.g. eval/arc_easy/acc from eval.tasks, "
                                    "val_loss) against processed tokens")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..train.plot import plot_metric, plot_runs

    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    if args.metric:
        out = plot_metric([Path(d) for d in args.run_dirs], Path(args.out), args.metric)
    else:
        out = plot_runs([Path(d) for d in args.run_dirs], Path(args.out), args.smooth)
    print(f"wrote {out}")
    return 0
