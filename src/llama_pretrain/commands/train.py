"""`llama-pretrain train`: the paper's recipe on prepared shards, or (no --config) the built-in demo."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DESCRIPTION = """\
Train a Llama model with the recipe of the Llama 2 paper (AdamW 0.9/0.95, eps 1e-5, weight decay
0.1 on linear weights, linear warm-up then cosine decay to 10% of peak, clipping at 1.0, a global
batch given in tokens). Checkpoints go to RUN_DIR/checkpoints and a run dir that has one resumes
from it automatically; metrics go to RUN_DIR/metrics.jsonl; the final model to RUN_DIR/final.

Without --config this runs the built-in end-to-end demo on 2 CPU cores in a few minutes: a corpus
from Python's own standard library -> tokenizer -> shards -> llama2-tiny -> summary, Figure-5 plot
and a generated sample (run dir runs/demo; re-running reuses finished stages).

Every config key can be overridden as --section.key=value (listed below; --model.<field> takes any
ModelConfig field, e.g. --model.n_layers=2). Under torchrun the same command trains data-parallel
(see --parallel.mode). docs/config-reference.md documents every key."""


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import ModelConfig
    from ..train.config import SECTIONS

    p = sub.add_parser("train", help="pretrain a model (no arguments: the built-in CPU demo)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML run config (see configs/); omit for the built-in demo")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>, runs/demo for the demo)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint to resume from (a run dir with one resumes anyway)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--export-checkpoint", metavar="CKPT_DIR",
                   help="instead of training: turn a training checkpoint (RUN_DIR/checkpoints/step-N, any "
                        "world size) into a native model dir (needs --out)")
    p.add_argument("--out", help="output dir for --export-checkpoint")
    p.add_argument("--force", action="store_true", help="with --export-checkpoint: replace --out if it exists")
    g = p.add_argument_group("config overrides (--section.key=value)", OVERRIDES_HELP)
    g.add_argument("--model.preset", dest="ov:model.preset", metavar="NAME",
                   help="model preset (llama2-7b ... llama2-tiny, llama2-debug); default llama2-tiny")
    for f in dataclasses.fields(ModelConfig):
        g.add_argument(f"--model.{f.name}", dest=f"ov:model.{f.name}", metavar="V", help=argparse.SUPPRESS)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            several = f"{section}.{f.name}" in REPEATABLE
            g.add_argument(f"--{section}.{f.name}", dest=f"ov:{section}.{f.name}", metavar="V",
                           action="append" if several else "store", help=default_help(section, f))
    p.add_argument("--init-from", dest="ov:checkpoint.init_from", metavar="PATH",
                   help="start a new run from these weights (our model dir, a Hugging Face or Meta Llama "
                        "dir, a training checkpoint): fresh optimizer, schedule and step count; the same "
                        "as --checkpoint.init_from")
    refuse_unknown_flags(p)
    p.set_defaults(func=run)


def refuse_unknown_flags(parser: argparse.ArgumentParser) -> None:
    """A mistyped flag is train's own error (its usage and the closest valid key), not the top-level
    parser's bare "unrecognized arguments", which it would otherwise become."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        if extras:
            parser.error(unknown_argument_message(extras[0], parser))
        return namespace, extras

    # this instance only (the subparsers action makes the parser): mypy forbids any method assignment
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def unknown_argument_message(arg: str, parser: argparse.ArgumentParser) -> str:
    """'unrecognized argument X; did you mean --closest.key?' when a valid flag is close."""
    import difflib

    flag = arg.partition("=")[0]
    flags = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(flag, flags, n=1) if flag.startswith("--") else []
    hint = f"did you mean {close[0]}?" if close else "config keys are --section.key=value (see --help)"
    return f"unrecognized argument {arg}; {hint}"


OVERRIDES_HELP = """\
"default" is what a run with --config gets when its TOML omits the key; plain `train` (the demo, no
--config) uses configs/demo.toml's value where "demo:" gives one, and data.path RUN_DIR/data."""


DEFAULT_MEANS = {"optimizer.lr": "the preset's peak_lr", "training.seq_len": "0 (the model's max_seq_len)"}


def default_help(section: str, f: dataclasses.Field) -> str | None:
    """The default with --config, and the demo's value where the demo differs."""
    from ..train.demo import DEMO_CONFIG

    if f.default is dataclasses.MISSING:
        if f.default_factory is dataclasses.MISSING:
            return None
        return f"default {f.default_factory()!r}"
    demo = DEMO_CONFIG.get(section, {}).get(f.name, f.default)
    shown = DEFAULT_MEANS.get(f"{section}.{f.name}", repr(f.default))
    return f"default {shown}" + (f" (demo: {demo!r})" if demo != f.default else "")


# Keys a repeated flag gives several values of (--data.path=A --data.path=B), rather than the last one.
REPEATABLE = ("data.path",)


def overrides_from_args(args) -> list[str]:
    from ..train.config import _toml_value as toml_value

    out = []
    for k, v in vars(args).items():
        if k.startswith("ov:") and v is not None:
            several = isinstance(v, list) and len(v) > 1
            out.append(f"{k[3:]}={toml_value(v) if several else v[0] if isinstance(v, list) else v}")
    return out


def run(args) -> int:
    from ..train.distributed import shutdown_distributed
    from ..train.preemption import Preempted

    try:
        return _run(args)
    except Preempted as stop:  # a signal: the step in progress was checkpointed
        return report_preempted(stop)
    finally:
        shutdown_distributed()  # under torchrun: leave the process group cleanly


def report_preempted(stop) -> int:
    """One line (rank 0) naming the checkpoint and the command that resumes; exit 128 + signal."""
    import os
    import shlex

    if os.environ.get("RANK", "0") == "0":
        torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        again = "the same torchrun command" if torchrun else "llama-pretrain " + shlex.join(sys.argv[1:])
        if stop.trained:
            what = f"saved {stop.checkpoint}; resume with: {again}"
        elif stop.checkpoint is not None:
            what = f"no step finished since {stop.checkpoint}, which resumes with: {again}"
        else:
            what = "no step finished: nothing trained yet, nothing saved"
        print(f"llama-pretrain train: {stop}: {what}", file=sys.stderr)
    return stop.exit_code


def _run(args) -> int:
    from ..errors import UserError, alike_on_every_rank

    overrides = overrides_from_args(args)
    if (args.out or args.force) and not args.export_checkpoint:
        raise UserError("--out and --force only go with --export-checkpoint (a run writes to --run-dir)")
    if args.export_checkpoint:
        if not args.out:
            raise UserError("--export-checkpoint needs --out DIR")
        from ..interop.training_checkpoint import export_checkpoint
        from .interop import check_out
        out = export_checkpoint(Path(args.export_checkpoint), check_out(args.out, args.force))
        print(f"wrote {out}")
        return 0
    if args.config is None:
        from ..train.demo import run_demo
        return run_demo(Path(args.run_dir or "runs/demo"), overrides, print_config=args.print_config)

    from ..train.config import load_run_config
    from ..train.loop import train
    from ..train.summary import print_summary

    try:
        cfg = load_run_config(args.config, overrides)
    except UserError as e:  # the same on every rank under torchrun: rank 0 says it
        raise alike_on_every_rank(e) from None
    if args.print_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
    summary = train(cfg, run_dir, resume=args.resume)
    if summary:
        print_summary(summary, run_dir)
    return 0
