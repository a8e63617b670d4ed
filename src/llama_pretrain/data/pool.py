"""Worker pools and progress bars of the data pipeline: fork where it is safe, Ctrl-C that stops
the item in progress, tqdm bars only on a terminal."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

from tqdm import tqdm

_interrupted = False  # a pool worker that got Ctrl-C (see init_worker)
_in_unit = False


def init_worker() -> None:
    """In each pool worker: Ctrl-C (which the terminal sends to the whole process group) stops the
    file in progress and makes the worker skip the ones already queued to it, rather than finish
    them first; between files it only takes note (an exception there would kill the worker).
    A SIGINT ignored by the caller (a job started in the background) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return

    def on_sigint(signum, frame):
        global _interrupted
        _interrupted = True
        if _in_unit:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Around one item in a pool worker: a Ctrl-C now raises here, and one that came while the
    worker was between items stops it before it starts the next."""
    global _in_unit
    if _interrupted:
        raise KeyboardInterrupt
    _in_unit = True
    try:
        yield
    finally:
        _in_unit = False


def _terminal(progress: bool) -> bool:
    """A progress bar only on a terminal: tqdm's carriage returns do not belong in a log file."""
    return progress and sys.stderr.isatty()


class _Bar(tqdm):
    """tqdm without its monitor thread, which its first bar starts (shown or not) and which would
    make every later pool of this process spawn rather than fork (``pool_context``)."""

    monitor_interval = 0


def progress_bar(progress: bool, **kwargs) -> tqdm:
    return _Bar(disable=not _terminal(progress), file=sys.stderr, dynamic_ncols=True, **kwargs)


def pool_context():
    """fork where it is safe, else spawn. A forked worker starts at once with this process's
    imports (a spawned one spends ~0.2 s on an interpreter, numpy and the pipeline's modules before
    its first file: BENCHMARKS.md, data) and needs no ``__main__`` guard in a calling script. Not
    with another Python thread alive (it may hold a lock the child then waits on forever; native
    threads such as numpy's BLAS pool handle a fork themselves), after torch is imported (its
    thread pools do not survive a fork), or on macOS (whose system libraries may crash in a forked
    child; Python spawns there by default)."""
    import multiprocessing as mp
    import threading

    if sys.platform.startswith("linux") and threading.active_count() == 1 and "torch" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("spawn")
