"""`llama-pretrain data prepare | merge | inspect`: build and look at token-shard datasets."""

from __future__ import annotations

import argparse
import json
import sys

PREPARE_HELP = """\
Turn raw documents into cleaned, deduplicated, mixed token shards (+ manifest.json).

Stages (each switchable, with thresholds, in the data config's [stages.*] tables): text
normalisation, site blocklist (a default list of people-search / public-records sites plus
yours), optional PII scrubbing, Gopher quality and repetition rules, C4 line rules, exact dedup,
MinHash-LSH near dedup (word 5-grams, 14 bands x 8 rows), tokenisation (BOS text EOS), a
deterministic train/validation split and the mixture weights (2.0 = up-sample twice).

Bad records (malformed JSON, invalid UTF-8, missing text field, empty or binary files) are dropped
and counted by reason with their first file:line locations; --strict stops at the first one.
Re-running the same command resumes: finished input files are not processed again. The output is
the same for any --workers. Phase 2 (dedup, split, mixing, shard writing) runs as stages of
tasks whose memory does not grow with the corpus. For a cluster, run each stage as a job array
into a shared --out (--stage S --num-tasks N --task-index I; examples/slurm/submit.sh chains
them), or run N jobs with --num-tasks N --task-index I (each with its own --out) and join them
with `llama-pretrain data merge`. The output is the same either way.
"""


STAGES = ("units", "keys", "dedup", "resolve", "split", "plan", "write", "finish")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards from raw documents (clean, dedup, mix)")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    pr = dsub.add_parser("prepare", help="raw documents -> token shards + manifest.json",
                         description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a TOML data config ([[sources]] with name, paths, text_field, "
                                      "url_field, weight; [stages.*] settings)")
    src.add_argument("--input", nargs="+", metavar="PATH",
                     help="one source from files, directories or globs (JSONL / JSONL.gz with a "
                          "`text` field, Parquet, or plain-text files, one document each)")
    pr.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
    pr.add_argument("--out", required=True, help="output dataset directory")
    pr.add_argument("--text-field", default="text", help="JSON/Parquet field with the text (--input only)")
    pr.add_argument("--url-field", default=None, help="field with the page URL, for the blocklist (--input only)")
    pr.add_argument("--no-quality", action="store_true",
                    help="skip the Gopher and C4 quality rules (e.g. for code or short texts)")
    pr.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    pr.add_argument("--strict", action="store_true", help="stop with an error at the first bad record")
    pr.add_argument("--num-tasks", type=int, default=1, help="split the input files over N jobs")
    pr.add_argument("--task-index", type=int, default=0, help="which of the --num-tasks jobs this is")
    pr.add_argument("--stage", choices=STAGES, default=None,
                    help="run only this task's share of one stage, into a --out shared by all tasks "
                         "(a job array per stage, in this order: " + ", ".join(STAGES) + "; see "
                         "docs/data.md); without it, every stage runs here in --workers processes")
    pr.add_argument("--range-docs", type=int, default=None, metavar="N",
                    help="documents per hash range in the dedup stage (default 262144): what bounds "
                         "the memory of a dedup task; the output does not depend on it")
    pr.add_argument("--unit-bytes", default="256M", metavar="N",
                    help="read a bigger JSONL file (by byte range) or Parquet file (by row groups) as "
                         "several units, so one big file uses every worker; 64M, 1G, ... (default 256M; "
                         "the output does not depend on it)")
    pr.add_argument("--val-fraction", type=float, default=None,
                    help="share of documents for validation (default: config or 0.005; never empty "
                         "when there are at least 2 documents)")
    pr.add_argument("--seed", type=int, default=None, help="seed for the split and partial up-sampling")
    pr.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    pr.set_defaults(func=run_prepare)

    mg = dsub.add_parser("merge", help="join the parts of a --num-tasks run into one dataset",
                         description="Runs dedup (across tasks), split, mixing and shard writing "
                                     "over the units of all parts; the result equals a one-job run.")
    mg.add_argument("parts", nargs="+", metavar="PART_DIR")
    mg.add_argument("--out", required=True, help="output dataset directory")
    mg.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    mg.add_argument("--quiet", action="store_true")
    mg.set_defaults(func=run_merge)

    ins = dsub.add_parser("inspect", help="summary of a prepared dataset (and a sample document)")
    ins.add_argument("dir")
    ins.add_argument("--json", action="store_true", help="print the manifest's accounting as JSON")
    ins.add_argument("--show", type=int, default=0, metavar="N",
                     help="decode and print the first N validation documents (needs the tokenizer)")
    ins.set_defaults(func=run_inspect)


def run_prepare(args) -> int:
    from ..data.prepare import format_summary, prepare, prepare_stage
    from ..data.sources import DataConfig, SourceConfig, load_data_config, parse_bytes
    from ..errors import UserError

    if args.config:
        if args.no_quality or args.text_field != "text" or args.url_field:
            raise UserError("--text-field, --url-field and --no-quality go with --input; "
                            "set them in the config instead")
        cfg = load_data_config(args.config)
    else:
        cfg = DataConfig(sources=[SourceConfig("input", list(args.input), args.text_field, args.url_field,
                                               quality=False if args.no_quality else None)])
    if args.val_fraction is not None:
        cfg.val_fraction = args.val_fraction
    if args.seed is not None:
        cfg.seed = args.seed
    cfg.validate()
    run = dict(workers=args.workers, strict=args.strict, num_tasks=args.num_tasks, task_index=args.task_index,
               progress=not args.quiet, unit_bytes=parse_bytes(args.unit_bytes), range_docs=args.range_docs)
    m = (prepare_stage(cfg, args.tokenizer, args.out, args.stage, **run) if args.stage
         else prepare(cfg, args.tokenizer, args.out, **run))
    if m is None:  # one task of one stage, not the last one
        if not args.quiet:
            print(f"stage {args.stage}: task {args.task_index} of {args.num_tasks} done")
        return 0
    if not args.quiet:
        print(format_summary(m))
        reused = m.get("_reused_units", 0)
        if reused:
            print(f"(reused {reused} already processed input file(s))")
        print(f"wrote {args.out}")
    return 0


def run_merge(args) -> int:
    from ..data.merge import merge
    from ..data.prepare import format_summary

    m = merge(args.parts, args.out, progress=not args.quiet, workers=args.workers)
    if not args.quiet:
        print(format_summary(m))
        print(f"wrote {args.out}")
    return 0


def run_inspect(args) -> int:
    from ..data.prepare import format_summary
    from ..data.shards import iter_documents, read_manifest

    m = read_manifest(args.dir)
    if args.json:
        json.dump({k: m[k] for k in ("tokenizer", "splits", "total", "sources", "warnings") if k in m},
                  sys.stdout, indent=2)
        print()
    else:
        print(format_summary(m))
        print(f"tokenizer: {m['tokenizer']['path']} (sha256 {m['tokenizer']['sha256'][:12]}, "
              f"vocab {m['tokenizer']['vocab_size']}), dtype {m['dtype']}")
    if args.show:
        from ..tokenizer import Tokenizer

        tok = Tokenizer(m["tokenizer"]["path"])
        for i, doc in enumerate(iter_documents(args.dir, "val")):
            if i >= args.show:
                break
            print(f"--- val document {i} ({len(doc)} tokens)")
            print(tok.decode(doc.tolist()))
    return 0
