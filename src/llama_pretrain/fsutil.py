"""Safe file writes: temporary name, fsync, rename; never a half-written file under its final name.

Outputs get the usual permissions (``0666 & ~umask``, so 0644 under umask 022) whatever created
them, and a write that runs out of space or quota removes its partial files, leaves the previous
output in place and raises ``DiskFull``: one line naming the output, the bytes it needed, what is free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError):
    """A write ran out of space or quota; its partial files are already removed."""

    def __init__(self, output: Path, written: int):
        super().__init__(output, written)
        self.output, self.written = Path(output), written

    def __str__(self) -> str:  # when printed, after every partial file is gone: what is free then
        parent = existing_parent(self.output.parent)  # where the temporary sibling was written
        needed = f"it needs more than {self.written:,} bytes and " if self.written else ""
        return (f"no space left to write {self.output}: {needed}{free_bytes(parent):,} bytes are free in "
                f"{parent}; free some space or write elsewhere")


def existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def out_of_space(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wraps the OS error in its own type (safetensors does)."""
    if isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE):
        return True
    text = str(exc)
    return any(os.strerror(code) in text for code in _OUT_OF_SPACE)


def _written(exc: BaseException) -> int:
    """Bytes a nested atomic write had written when it ran out of space (its files are gone)."""
    return exc.written if isinstance(exc, DiskFull) else 0


def tree_bytes(path: Path) -> int:
    """Bytes in the file ``path``, or in the files under the directory ``path``."""
    with contextlib.suppress(OSError):
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files)
    return 0


@contextlib.contextmanager
def reporting_full_disk(output: str | Path, written=lambda: 0) -> Iterator[None]:
    """Running out of space inside the block becomes ``DiskFull`` for ``output``, for writes that
    are not one atomic_file/atomic_dir (the caller removes the partial files); ``written()``: the
    bytes written so far."""
    try:
        yield
    except Exception as exc:
        if out_of_space(exc):
            raise DiskFull(Path(output), written() + _written(exc)) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> int:
    """0666 & ~umask (0777 for executables): what open() would give, not mkstemp's or safetensors' 0600."""
    executable = os.stat(path).st_mode & 0o100
    return (0o777 if executable else 0o666) & ~_umask()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_tree(tmp: Path) -> None:
    """fsync every file of ``tmp`` and give it the usual permissions."""
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, usual_mode(f))
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync its files and rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _seal_tree(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(exc):
            raise DiskFull(final, written + _written(exc)) from exc
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; fsync and rename it on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    fh = os.fdopen(fd, mode)
    try:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        written = tree_bytes(Path(tmp))
        with contextlib.suppress(OSError):
            fh.close()  # its buffer is being discarded: a flush that fails here is no news
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if out_of_space(exc):
            raise DiskFull(final, written + _written(exc)) from exc
        raise


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (checkpoint shards can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
