"""What ``data prepare`` and ``data merge`` own in ``--out``, and how a new dataset replaces the
old one: the names they write (only those are ever replaced or removed), the lock on the
directory, and the swap of the staged splits."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from ..config import parse_json
from ..errors import UserError
from ..fsutil import Owned, check_output_dir, foreign_file, fsync_dir
from .shards import FORMAT, MANIFEST

WORK = "_work"
LOCK = "lock"  # in _work/: held while a command writes the dataset dir (out_lock)
UNIT_NAMES = ("tokens", "lengths", "hashes", "minhash")  # a phase-1 unit's NAME.bin files


STAGING = ".staging"


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (the swap of a few renames: stopped midway,
    the directory would hold half of each dataset until a re-run). Only the main thread can."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def swap_in(staging: Path, out: Path, resume: bool = False) -> None:
    """The manifest goes first and comes back last, so a dataset dir with a manifest is whole.
    With ``resume`` (a swap that was killed midway) what staging no longer holds was moved already."""
    if not resume or (staging / MANIFEST).exists():  # else the manifest, moved last, is in place
        (out / MANIFEST).unlink(missing_ok=True)
        for split in ("train", "val"):
            if resume and not (staging / split).exists():
                continue
            if (out / split).exists():
                shutil.rmtree(out / split)
            os.rename(staging / split, out / split)
        os.rename(staging / MANIFEST, out / MANIFEST)
    if staging.exists() or not resume:
        staging.rmdir()
    fsync_dir(out)


def check_out_dir(out: str | Path, what: str = "data prepare") -> Path:
    """``out`` as a Path, refused (``UserError``) before any work unless it is new, empty or holds
    only what data prepare / merge write there (``dataset_foreign``)."""
    return check_output_dir(out, dataset_foreign, what, whole=False)


# What data prepare and merge write into --out (regexes for names: None a file, a dict a directory
# laid out so, an Owned a directory of those files); only this is ever replaced or removed there.
UNIT_FILES = Owned("data prepare", frozenset([*(f"{n}.bin" for n in UNIT_NAMES), "stats.json"]),
                   "stats.json", lambda st: "fingerprint" in st)
_SHARDS = {r"\d{5,}\.(bin|idx)": None}
_STAGING = {re.escape(MANIFEST): None, rf"\.{re.escape(MANIFEST)}\.tmp-\w+": None,
            "train|val": {**_SHARDS, r"\.\d{5,}\.(bin|idx)\.tmp-\w+": None}}
_WORK: dict[str, Any] = {"units": {".+": {r"\d{6,}(-\d{4,})?": UNIT_FILES,  # a unit (a file or a part of one); and
                          # one a killed run left half-written:
                          r"\.\d{6,}(-\d{4,})?\.tmp-\w+": {"|".join(map(re.escape, UNIT_FILES.names)): None}}}}


# Phase 2's work files (phase2/): <fingerprint>/{keys,dedup,resolve,split,write}/ files,
# done/<stage>/<item> markers and plan.json, each possibly as a temporary being written.
_P2_FILES = {r"\.?(?:[\w-]+\.(?:bin|idx|npz|json)|\d{8})(?:\.tmp-\w+)?": None}
_WORK[LOCK] = None
_WORK["phase2"] = {r"[0-9a-f]{32}": {"keys|dedup|resolve|split|write": _P2_FILES, "done": {r"[a-z]+": _P2_FILES},
                                    r"\.?plan\.json(?:\.tmp-\w+)?": None}}


def dataset_foreign(out: Path, walk_work: bool = True) -> str | None:
    """The first entry under ``out`` (a path relative to it) that data prepare did not write: not
    one of its names, a symlink, or a shard its ``manifest.json`` does not list (with no manifest of
    ours, ``train/`` and ``val/`` are ours only when empty). Without ``walk_work``, ``_work/`` is
    taken as ours unread: a stage task between the first and the last writes only its own names
    there, and does not walk the work files of a whole corpus once per task."""
    listed = _listed_shards(out / MANIFEST)
    work = _WORK if walk_work else _UNREAD
    # A swap stopped midway (the new manifest still in staging, the old one gone): train/ and val/
    # hold shards of the old or the new dataset, which the re-run's finish stage replaces.
    swapping = listed is None and _listed_shards(out / STAGING / MANIFEST) is not None
    top: dict[str, Any] = {re.escape(STAGING): _STAGING, WORK: work, "train|val": _SHARDS if swapping else {}}
    if listed is not None:
        top.update({re.escape(MANIFEST): None, **{sp: {re.escape(n): None for n in names}
                                                  for sp, names in listed.items()}})
        del top["train|val"]
    return _foreign(out, top)


class _Unread:
    """A directory taken as ours without reading it."""

    @staticmethod
    def foreign(d: Path) -> None:
        return None


_UNREAD = _Unread()


def _foreign(d: Path, layout: dict[str, Any]) -> str | None:
    for p in sorted(d.iterdir()):
        keys = [k for k in layout if re.fullmatch(k, p.name)]
        sub = layout[keys[0]] if keys else None
        if not keys or sub is None or p.is_symlink() or not p.is_dir():
            bad = foreign_file(p, bool(keys) and sub is None)
        else:
            inner = sub.foreign(p) if isinstance(sub, (Owned, _Unread)) else _foreign(p, sub)
            bad = inner and f"{p.name}/{inner}"
        if bad:
            return bad
    return None


def _listed_shards(path: Path) -> dict[str, set[str]] | None:
    """Per split, the file names a data prepare manifest lists; None if ``path`` is not one."""
    try:
        m = parse_json(path.read_text(encoding="utf-8"))
        if m.get("format") != FORMAT:
            return None
        listed: dict[str, set[str]] = {"train": set(), "val": set()}
        for split, names in listed.items():
            for shard in m["splits"][split]["shards"]:
                for f in (shard["file"], shard["index"]):
                    head, _, name = f.partition("/")
                    if head != split:
                        return None
                    names.add(name)
        return listed
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def out_lock(out: Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold ``OUT/_work/lock`` while a command writes ``out``: exclusively for a whole run, shared
    for one stage task (the tasks of a job array write side by side), so that two runs into one
    directory are refused in one line instead of failing midway. A lock that cannot be had fails
    at once rather than waiting."""
    import fcntl

    path = out / WORK / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what}: {out} is being written by another data prepare or merge (it holds "
                            f"{path}); let it finish first") from None
        yield
