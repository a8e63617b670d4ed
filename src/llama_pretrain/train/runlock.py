"""One job per run dir: ``RUN_DIR/.lock``, held with ``flock`` by rank 0 while the run trains.

The kernel (or the file server) drops the lock when its holder dies, however it dies, so a lock
left by a killed job never blocks the rerun; the file's text (host, PID, start time) only names
the holder in the refusal and is cleared when a run ends cleanly. The file itself is never
deleted: a job that opened the old file could then hold a lock nobody else sees.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError
from .parallel import DistInfo, gather_object
from .report import say

LOCK_FILE = ".lock"
# A filesystem that does not do locks answers with one of these (NFS mounted nolock, Lustre without -o flock).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """``with RunLock(run_dir, info) as lock: ... lock.acquire()``: released on leaving the block."""

    def __init__(self, run_dir: Path, info: DistInfo):
        self.path, self.info = Path(run_dir) / LOCK_FILE, info
        self._fh = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock on rank 0; every rank raises the same UserError when another job holds it."""
        refusal = self._try_lock() if self.info.is_main else None
        refusal = gather_object(refusal)[0]
        if refusal:
            raise UserError(refusal)

    def release(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()  # a clean end: no holder to name
        self._fh.close()  # closing drops the lock
        self._fh = None

    def _try_lock(self) -> str | None:
        """None when locked (or the filesystem cannot lock); else the refusal, naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            return f"cannot create the run dir's lock file {self.path}: {e.strerror}"
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            fh.seek(0)
            holder = describe_holder(fh.read())
            fh.close()
            if e.errno in _NO_LOCKS:
                say(f"warning: {self.path.parent} is on a filesystem without file locks ({e.strerror}); "
                    f"nothing stops a second job from training into it (README: one job per run dir)")
                return None
            return (f"{self.path.parent} is in use by another job ({holder}); wait for it to end, stop it, "
                    f"or use another --run-dir")
        self._take(fh)
        return None

    def _take(self, fh) -> None:
        fh.seek(0)
        previous = fh.read().strip()
        if previous:
            say(f"taking over the lock of a job that ended without releasing it ({describe_holder(previous)})")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
        fh.flush()
        self._fh = fh


def describe_holder(text: str) -> str:
    """'host H, PID P, since T' from the lock file's text (which may be empty or half-written)."""
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, PID {holder['pid']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
