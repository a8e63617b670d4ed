"""One job per run dir: ``RUN_DIR/.lock``, held with ``flock`` by rank 0 while the run trains.

The kernel (or the file server) drops the lock when its holder dies, however it dies, so a lock
left by a killed job never blocks the rerun; the file's text (host, PID, start time) only names
the holder in the refusal and is cleared when a run ends cleanly. A run that created the file
and ends with an error removes it again (and the run dir, when it created that and left it
empty), so a refused run leaves nothing behind; it unlinks the file while still holding the lock,
and a job that locks a file no longer under the lock's name lets it go and tries again, so no two
jobs can each hold a lock of their own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import TextIO

from ..config import parse_json
from ..errors import UserError
from .distributed import DistInfo, gather_object
from .report import say

LOCK_FILE = ".lock"
_GONE = "gone"  # _try_lock_once: the file was removed under us; try again
# A filesystem that does not do locks answers with one of these (NFS mounted nolock, Lustre without -o flock).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """``with RunLock(run_dir, info) as lock: ... lock.acquire()``: released on leaving the block."""

    def __init__(self, run_dir: Path, info: DistInfo):
        self.path, self.info = Path(run_dir) / LOCK_FILE, info
        self._fh: TextIO | None = None
        self._created: list[Path] = []  # what taking the lock created: the run dir, the lock file

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self._fh is not None:
            self._remove_created()
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

    def _remove_created(self) -> None:
        """After an error: the lock file this run created (unlinked while still locked), then the
        run dir it created, if nothing else was written there."""
        if self.path in self._created:
            self.path.unlink(missing_ok=True)
        if self.path.parent in self._created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.path.parent.rmdir()

    def _try_lock(self) -> str | None:
        """None when locked (or the filesystem cannot lock); else the refusal, naming the holder."""
        for _ in range(10):  # another job removed the file between our open and our lock: again
            refusal = self._try_lock_once()
            if refusal != _GONE:
                return refusal
        return f"cannot lock {self.path}: it keeps being removed and created again"

    def _try_lock_once(self) -> str | None:
        created = [p for p in (self.path.parent, self.path) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")
        except FileNotFoundError:
            return _GONE  # the run dir was removed in between
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
                    f"nothing stops a second job from training into it (docs/training.md: one job per run dir)")
                return None
            return (f"{self.path.parent} is in use by another job ({holder}); wait for it to end, stop it, "
                    f"or use another --run-dir")
        if not _still_named(fh, self.path):
            fh.close()
            return _GONE
        self._created = created
        self._take(fh)
        return None

    def _take(self, fh: TextIO) -> None:
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


def _still_named(fh, path: Path) -> bool:
    """The locked file is the one at ``path`` (not one a failed run unlinked after we opened it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def describe_holder(text: str) -> str:
    """'host H, PID P, since T' from the lock file's text (which may be empty or half-written)."""
    try:
        holder = parse_json(text)
        return f"host {holder['host']}, PID {holder['pid']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
