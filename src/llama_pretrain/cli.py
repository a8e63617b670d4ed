"""The ``llama-pretrain`` command: one subcommand per pipeline stage.

Each module in ``commands/`` adds its subcommands with ``register(subparsers)`` and imports its
heavy dependencies (torch, sentencepiece, ...) only when run, so ``--help`` is instant. A
``UserError`` is printed as one line and exits with code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from .errors import UserError

# Order is the order `--help` lists them in.
COMMAND_MODULES = [
    "train", "data", "tokenizer", "model", "generate", "interop", "eval", "contamination",
    "plot", "ladder", "plan", "carbon",
]


# How long a rank other than 0 waits for torchrun to stop it after an error every rank shares.
RANK0_GRACE_S = 10.0


def _another_rank() -> bool:
    """Under torchrun, a rank other than 0 (which stays quiet about errors every rank shares)."""
    return os.environ.get("RANK", "0") != "0"


def _leave_it_to_rank0() -> bool:
    """On a rank other than 0, an error every rank meets alike: let rank 0 report it. True when this
    rank should report it anyway.

    Exiting at once races on rank 0's node: its torchrun agent stops every local worker when the
    first one exits, and could kill rank 0 before it prints. So there a rank waits; rank 0 exits 2
    moments later and torchrun stops this process, normally well within the grace. If nothing
    stops it (rank 0 did not fail: its inputs differ), it reports the error after all. Elsewhere
    (other nodes, launchers other than torchrun) no agent ties this rank to rank 0: exit quietly."""
    on_rank0_node = "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("GROUP_RANK", "0") == "0"
    if not on_rank0_node:
        return False
    try:
        time.sleep(RANK0_GRACE_S)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    return True


class _Parser(argparse.ArgumentParser):
    """argparse, except that under torchrun only rank 0 prints a usage error (every rank parses the
    same command line); see ``_leave_it_to_rank0``. Subcommands inherit it."""

    def error(self, message: str):
        if _another_rank() and not _leave_it_to_rank0():
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="llama-pretrain",
        description="The Llama 2 pretraining pipeline: tokenizer, data, training, evaluation, "
                    "compute and carbon. Run `llama-pretrain train` with no arguments for the "
                    "built-in end-to-end demo.",
    )
    parser.add_argument("--version", action="version", version=f"llama-pretrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:  # a module that fails to import is a packaging bug: let it raise
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as e:
        if not (e.alike_on_every_rank and _another_rank()) or _leave_it_to_rank0():  # once, by rank 0
            print(f"llama-pretrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-pretrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(result or 0)
