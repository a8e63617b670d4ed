"""Stopping a run cleanly on SIGTERM, SIGINT or SIGUSR1 (preemption, Ctrl-C, a time limit ahead).

While training, these signals only set a flag: the optimizer step in progress finishes, the loop
checkpoints that step and raises ``Preempted``, and the CLI prints the checkpoint and exits with
128 + the signal's number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1). Under torchrun the ranks agree
(a max over ranks after every step), so every rank saves the same step even when the signal
reached them at different moments. A second signal is reported and otherwise ignored: the
checkpoint being written finishes (it is renamed into place only when complete, so stopping the
process hard at that moment leaves the previous checkpoint as it was).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from .distributed import all_reduce_max

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal at ``step``; ``checkpoint`` holds it, written now when
    ``trained`` (False: no step finished in this process; None: nothing trained yet at all)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, trained: bool):
        self.signum, self.step, self.checkpoint, self.trained = signum, step, checkpoint, trained
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """A context manager that turns the stop signals into a flag (main thread only; elsewhere
    Python cannot install handlers and the signals keep their default action)."""

    def __init__(self, is_main: bool = True) -> None:
        self.is_main = is_main
        self.received: int | None = None
        # what signal.signal returns: a handler, SIG_DFL / SIG_IGN, or None (not set from Python)
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first, self.received = self.received is None, self.received or signum
        if not self.is_main:
            return
        if first:
            _write_stderr(f"received {name}: finishing this step, then saving a checkpoint")
        else:
            _write_stderr(f"received {name} again: still stopping (the checkpoint being written "
                          f"finishes; the previous one stays intact)")

    def agreed(self) -> int | None:
        """The signal that stops the run, agreed by every rank (a collective under torchrun)."""
        return int(all_reduce_max(float(self.received or 0))) or None


def _write_stderr(line: str) -> None:
    """Safe inside a signal handler (print could re-enter a buffered stream mid-write)."""
    os.write(2, (line + "\n").encode())
