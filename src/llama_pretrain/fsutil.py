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
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, overload

from .config import parse_json
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


# ---------------------------------------------------------------------------------------------
# Output directories: a command replaces only what it recognises as its own earlier output


@dataclass(frozen=True)
class Owned:
    """The files a command writes into an output directory, and the JSON file that marks such a
    directory as its output (``is_ours`` tests the marker's object). A directory holding anything
    else, or no marker, is not the command's to replace."""

    what: str                           # the command, for messages
    names: frozenset[str]
    marker: str
    is_ours: Callable[[dict], bool]

    def foreign(self, d: Path) -> str | None:
        """The first entry of ``d`` the command did not write (a description), or None."""
        entries = sorted(os.listdir(d))
        for name in entries:
            bad = foreign_file(d / name, name in self.names)
            if bad:
                return bad
        if entries and not self._marked(d / self.marker):
            return self.marker if self.marker in entries else entries[0]
        return None

    def _marked(self, path: Path) -> bool:
        try:
            data = parse_json(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and bool(self.is_ours(data))


def foreign_file(path: Path, known: bool) -> str | None:
    """None for a regular file of a known name, else what ``path`` is (a symlink is never ours; of
    a directory, the first file in it)."""
    if path.is_symlink():
        return f"{path.name} (a symbolic link)"
    if known and path.is_file():
        return None
    inner = sorted(os.listdir(path)) if path.is_dir() else []
    return f"{path.name}/{foreign_file(path / inner[0], False)}" if inner else path.name


def refusal(out: Path, bad: str, what: str, force_flag: bool = False) -> UserError:
    hint = f" (--force replaces only {what}'s own output)" if force_flag else ""
    return UserError(f"refusing to write {out}: it holds {bad}, which {what} did not write{hint}; "
                     "move it away or give another --out")


def _refuse_unreplaceable(out: Path) -> None:
    """A directory that is renamed and replaced as a whole can be none of these."""
    try:
        where, cwd, home = out.resolve(), Path.cwd(), Path.home()
    except (OSError, RuntimeError) as e:  # a symlink loop, a removed cwd, no home
        raise UserError(f"--out {out}: cannot resolve it ({e})") from None
    what = ("the root directory" if where == where.parent else "your home directory" if where == home
            else "the current directory" if where == cwd else "a parent of the current directory"
            if where in cwd.parents else "no directory of its own" if out.name in ("", ".", "..") else None)
    if what:
        raise UserError(f"--out {out} is {what}; give a new or empty directory")


def check_output_dir(out: str | Path, foreign: Callable[[Path], str | None], what: str,
                     force: bool | None = None, whole: bool = True) -> Path:
    """Refuse, before any work, an ``--out`` directory the command could not write without removing
    what it did not write: a symlink, a non-directory, one holding a ``foreign`` entry (or, with
    ``whole``, ``/``, ``.``, home). ``force=False``: refuse its own earlier output too."""
    out = Path(out)
    if out.is_symlink():
        dangling = "" if out.exists() else " (dangling)"
        raise UserError(f"--out {out} is a symbolic link{dangling}; give a real directory")
    if whole:
        _refuse_unreplaceable(out)
    if not out.exists():
        parent = out.absolute().parent
        while not os.path.lexists(parent):
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"--out {out}: {parent} is not a directory")
        return out
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        bad = foreign(out) if any(out.iterdir()) else None
    except OSError as e:
        raise UserError(f"--out {out}: cannot read it ({e.strerror})") from None
    if bad is not None:
        raise refusal(out, bad, what, force is not None)
    if force is False and any(out.iterdir()):
        raise UserError(f"{out} already exists; pass --force to replace it")
    return out


def _check_replaceable(final: Path, owned: Owned | None) -> None:
    """A ``UserError`` unless ``final`` is missing, an empty directory or ``owned`` output."""
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise UserError(f"refusing to replace {final}: it is not a directory")
    entries = sorted(os.listdir(final))
    bad = owned.foreign(final) if owned else (entries[0] if entries else None)
    if bad is not None:
        raise refusal(final, bad, owned.what if owned else "this command")


def _replace_dir(tmp: Path, final: Path, owned: Owned | None) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` must be ``owned`` output (or empty): it is
    moved aside, put back if the rename fails, and only its known files are removed."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    _check_replaceable(final, owned)
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    old = aside / final.name
    try:
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)  # the previous output stays where it was
            raise
    except BaseException:
        aside.rmdir()
        raise
    for f in os.listdir(old):  # checked above: each is a regular file the command wrote
        if owned and f in owned.names:
            (old / f).unlink()
    with contextlib.suppress(OSError):  # not empty only if something appeared meanwhile: keep it
        old.rmdir()
        aside.rmdir()


@contextlib.contextmanager
def atomic_dir(final: str | Path, owned: Owned | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync its files and rename it to ``final``.
    An existing ``final`` is replaced only when it is empty or ``owned`` output (else ``UserError``)."""
    final = Path(final)
    _refuse_unreplaceable(final)
    _check_replaceable(final, owned)  # before any work; again when replacing
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _seal_tree(tmp)
        _replace_dir(tmp, final, owned)
        fsync_dir(final.parent)
    except BaseException as exc:
        written = tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(exc):
            raise DiskFull(final, written + _written(exc)) from exc
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "wb", durable: bool = True) -> Iterator:
    """Open a temporary sibling of ``final`` for writing; fsync (unless not ``durable``: a work
    file that is cheap to make again) and rename it on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    fh = os.fdopen(fd, mode)
    try:
        yield fh
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, final)
        if durable:
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


# A model directory's files (interop.model_dir says what is read from one, and why so).
def _allowed_roots(root: Path) -> list[Path]:
    """Where a file of ``root`` may really live: in it, or for an HF cache snapshot
    (``models--org--name/snapshots/REV``) in that model's ``blobs``."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


@overload
def model_file(root: str | Path, name: str, required: Literal[True] = ...) -> Path: ...
@overload
def model_file(root: str | Path, name: str, required: bool) -> Path | None: ...
def model_file(root: str | Path, name: str, required: bool = True) -> Path | None:
    """``root/name`` if it is a regular file inside ``root`` (through symlinks that stay there);
    None when absent and not ``required``; a one-line UserError otherwise."""
    root = Path(root)
    path = root / name
    if not os.path.lexists(path):
        if required:
            raise UserError(f"{path}: no such file")
        return None
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(root)):
        raise UserError(f"{path}: a symlink to {real}, outside {root}; a model directory's files must be in it")
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file")
    return path
