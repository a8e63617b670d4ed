"""`llama-pretrain contamination`: which eval samples appear in the training shards (appendix A.6)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "contamination", help="find eval samples that overlap the training token shards (Llama 2 A.6)",
        description="Mark the tokens of each formatted eval sample that lie in a token n-gram of length "
                    ">= L shared with the training shards (up to --max-mismatches substitutions, never at "
                    "the ends), report each sample's contaminated share and the Clean (<20%), Not clean "
                    "(>=20%), Not dirty (<80%) and Dirty (>=80%) subsets, and, given an eval results "
                    "file, the task's score on each subset. Shards are streamed from memory maps, so "
                    "they may be far larger than RAM.")
    p.add_argument("--shards", required=True, help="a prepared dataset dir (manifest.json + token shards)")
    p.add_argument("--task", required=True, help="task id (see `llama-pretrain eval --help`)")
    p.add_argument("--split", default="train", help="dataset split to scan (default train)")
    p.add_argument("--min-match", type=int, default=10, help="L: shortest shared n-gram (default 10; "
                                                             "the paper tries 10..50)")
    p.add_argument("--max-mismatches", type=int, default=4, help="substitutions allowed inside a match "
                                                                 "(default 4)")
    p.add_argument("--seed-len", type=int, help="exact seed length for the hash lookup (default L; smaller "
                                                "finds matches broken up by mismatches)")
    p.add_argument("--data-dir", help="eval data dir (as for `eval`)")
    p.add_argument("--tokenizer", help="tokenizer .model (default: the one in the shards' manifest)")
    p.add_argument("--limit", type=int, help="only the first N eval samples")
    p.add_argument("--results", help="results JSON from `llama-pretrain eval --out` to score the subsets")
    p.add_argument("--out", help="write the report JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    import numpy as np

    from ..data.shards import open_tokens
    from ..eval.contamination import SUBSETS, find_contamination, summarize
    from ..eval.evaluator import task_records
    from ..eval.tasks import TASKS
    from ..fsutil import atomic_file

    seed = _check_args(args)
    tok, tok_path = _shards_tokenizer(args)
    task = TASKS[args.task]
    records, source = task_records(task, args.data_dir)
    samples = task.samples(records)[:args.limit]
    ids = [s.id for s in samples]
    tokens = [np.asarray(tok.encode(task.example(s.doc)), dtype=np.int64) for s in samples]
    streams = open_tokens(args.shards, args.split)
    total = int(sum(len(s) for s in streams))
    print(f"{args.task}: {len(samples)} samples, {sum(map(len, tokens)):,} tokens; scanning {total:,} "
          f"{args.split} tokens (L={args.min_match}, seed={seed}, mismatches<={args.max_mismatches})",
          file=sys.stderr)
    marks = find_contamination(tokens, streams, min_match=args.min_match, max_mismatches=args.max_mismatches,
                               seed=seed, progress=sys.stderr.isatty(), total_tokens=total)
    scores = _read_scores(args) if args.results else None
    report = {"task": args.task, "data": source, "shards": args.shards, "split": args.split,
              "train_tokens": total, "min_match": args.min_match, "max_mismatches": args.max_mismatches,
              "seed_len": seed, "tokenizer": str(tok_path),
              "subset_rule": {k: f"{lo:.0%} <= share < {min(hi, 1):.0%}" if hi <= 1 else f"share >= {lo:.0%}"
                              for k, (lo, hi) in SUBSETS.items()},
              **summarize(ids, marks, scores)}
    _print_table(report, len(ids), scores is not None)
    if args.out:
        with atomic_file(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _check_args(args) -> int:
    """One-line errors for bad flags; returns the seed length."""
    from ..errors import UserError
    from ..eval.tasks import TASKS
    from .eval import check_out_file

    if args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    if args.min_match < 2:
        raise UserError("--min-match must be >= 2")
    if args.max_mismatches < 0:
        raise UserError("--max-mismatches must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    seed = args.seed_len or args.min_match
    if not 1 <= seed <= args.min_match:
        raise UserError("--seed-len must be between 1 and --min-match")
    check_out_file(args.out)  # before the scan, not after it
    return seed


def _shards_tokenizer(args):
    """(tokenizer, its path): --tokenizer, else the one the manifest names; it must be the one the
    shards were made with (same sha256)."""
    from pathlib import Path

    from ..data.shards import read_manifest
    from ..errors import UserError
    from ..eval.tokenization import TokenizerText

    tok_info = read_manifest(args.shards).get("tokenizer") or {}
    tok_path = args.tokenizer or tok_info.get("path")
    if not tok_path:
        raise UserError(f"{args.shards}: the manifest names no tokenizer; pass --tokenizer")
    if not Path(tok_path).is_file():
        raise UserError(f"tokenizer {tok_path} not found; pass --tokenizer (the one the shards were made with)")
    tok = TokenizerText(tok_path)
    if tok_info.get("sha256") and tok.tok.sha256 != tok_info["sha256"]:
        raise UserError(f"{tok_path} is not the tokenizer the shards were made with (sha256 differs)")
    return tok, tok_path


def _read_scores(args) -> dict[str, float]:
    """Per-sample scores of --task from an `eval --out` results file, by sample id."""
    from pathlib import Path

    from ..config import parse_json
    from ..errors import UserError

    try:
        doc = parse_json(Path(args.results).read_text())
        rows = doc["samples"][args.task]
        primary = doc["results"][args.task]["primary"]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --results {args.results}: {e}") from None
    except (KeyError, TypeError):
        raise UserError(f"{args.results}: no per-sample results for {args.task} "
                        f"(write it with `llama-pretrain eval --tasks {args.task} --out FILE`)") from None
    try:
        return {str(r["id"]): float(r[primary]) for r in rows if primary in r}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{args.results}: per-sample results for {args.task} need an id and a numeric "
                        f"{primary!r} in every row") from None


def _print_table(report: dict, n_samples: int, scored: bool) -> None:
    print(f"{'subset':<10} {'n':>6} {'share':>7} {'score':>7}")
    for name, e in report["subsets"].items():
        sc = f"{100 * e['score']:7.1f}" if e.get("score") is not None else f"{'-':>7}"
        print(f"{name:<10} {e['n']:>6} {100 * e['fraction']:6.1f}% {sc}")
    if scored and report.get("score_all") is not None:
        print(f"{'all':<10} {n_samples:>6} {100.0:6.1f}% {100 * report['score_all']:7.1f}")
