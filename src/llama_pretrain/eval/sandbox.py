"""Running generated programs safely: one process each, bounded in time, memory and reach.

Each program runs in a fresh ``python -I -B`` (no site-packages, no user environment) started
through ``unshare --mount --mount-proc --net --pid --fork --kill-child`` (plus ``--user
--map-root-user`` when not run as root), which gives it:

- a mount namespace in which every mount is read-only except its working directory, a private
  tmpfs of ``WORK_MB`` (files it writes vanish with it, and it cannot fill the disk);
- no network interface at all, and its own PID namespace with a fresh ``/proc``: it sees no
  other process, and everything it starts dies with it;
- the uid ``nobody`` (root's home, where pyenv keeps the interpreter, is replaced by a tmpfs
  holding only a read-only bind of the standard library), so ``RLIMIT_NPROC`` = 1 binds: no
  fork, thread or subprocess (for a non-root user: that user in a nested user namespace, whose
  capabilities reach none of the sandbox's namespaces); plus limits on CPU, address space, file
  size and descriptors, a wall-clock kill, a clean environment, and an audit hook as a last,
  bypassable, layer.

Where the kernel refuses namespaces, ``run_program`` raises ``UserError`` unless the caller
passes ``allow_unsandboxed=True``; then only the rlimits, the drop to ``nobody`` (when nobody can
read the standard library), the audit hook and the kill apply: writes, deletes and processes
are NOT contained. The verdict protocol is in ``_sandbox_child.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from ..errors import UserError

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
WORK_MB = 64  # the whole writable space of one program
NOBODY = 65534
_UNSHARE = ("--mount", "--mount-proc", "--net", "--pid", "--fork", "--kill-child")


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed", "failed" or "timeout"
    detail: str
    seconds: float


@lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that isolates a child here (checked by running a program
    through it), or () where the kernel refuses (containers often do)."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    # Root gets no user namespace: mapped root is still kernel root, exempt from RLIMIT_NPROC.
    prefix = (exe, *_UNSHARE) if os.geteuid() == 0 else (exe, *_UNSHARE, "--user", "--map-root-user")
    return prefix if _launch(prefix, "pass", timeout=20, memory_mb=256).passed else ()


def isolation() -> list[str]:
    """What protects the evaluator here (recorded with the results)."""
    prefix = namespace_prefix()
    common = ["wall-clock kill", "rlimits(cpu,as,fsize,nproc,nofile)", "audit-hook", "clean-env"]
    if not prefix:
        return ["UNSANDBOXED (--allow-unsandboxed)", *common]
    who = "nested userns(the user)" if "--user" in prefix else "uid nobody"
    return ["mountns(read-only, tmpfs workdir)", "netns", "pidns(fresh /proc)", who, *common]


def why_not_isolated() -> str | None:
    """Why generated code cannot be isolated here; None when it can."""
    if namespace_prefix():
        return None
    if not shutil.which("unshare"):
        return "`unshare` (util-linux) is not on PATH"
    return ("the kernel refuses the namespaces of `unshare --mount --net --pid` (a container without "
            "CAP_SYS_ADMIN or user namespaces?)")


def require_isolation(allow_unsandboxed: bool = False) -> None:
    """Refuses to go on where generated code could not be isolated, unless the user said so; then
    warns once on stderr that it runs unsandboxed."""
    why = why_not_isolated()
    if why is None:
        return
    if not allow_unsandboxed:
        raise UserError(f"cannot isolate generated code here: {why}; pass --allow-unsandboxed to run it "
                        f"with rlimits and an audit hook only, which do not stop file writes, deletes or "
                        f"new processes")
    _warn_unsandboxed(why)


@lru_cache(maxsize=None)
def _warn_unsandboxed(why: str) -> None:
    """One line per process (require_isolation is asked again for every program)."""
    print(f"warning: generated code runs UNSANDBOXED (--allow-unsandboxed; {why}): it can write and "
          f"delete your files and start processes; only rlimits, an audit hook and a timeout apply",
          file=sys.stderr)


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024,
                allow_unsandboxed: bool = False) -> ExecResult:
    """Run ``program`` (source text) in the sandbox; passed only if it runs to completion."""
    require_isolation(allow_unsandboxed)
    return _launch(namespace_prefix(), program, timeout, memory_mb)


def _launch(prefix: tuple[str, ...], program: str, timeout: float, memory_mb: int) -> ExecResult:
    tmp = tempfile.mkdtemp(prefix="llama-pretrain-exec-")
    if os.geteuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)  # unsandboxed, the worker may still drop to nobody
    env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    drop = bool(prefix) and "--user" not in prefix and os.geteuid() == 0
    settings = [max(1, int(timeout + 0.999)), memory_mb, WORK_MB, int(bool(prefix)), int(drop)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen([*prefix, sys.executable, "-I", "-B", CHILD, *map(str, settings)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=tmp, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(program.encode("utf-8", "surrogatepass"), timeout=timeout)
        except subprocess.TimeoutExpired:
            return ExecResult(False, "timeout", f"timed out after {timeout:g} s", time.monotonic() - start)
        finally:
            _kill_group(proc)  # anything it left behind in its process group
        lines = out.decode("utf-8", "replace").splitlines()
        verdict = lines[-1] if lines else ""
        seconds = time.monotonic() - start
        if proc.returncode == 0 and verdict == "PASS":
            return ExecResult(True, "passed", "", seconds)
        if verdict.startswith("FAIL "):
            return ExecResult(False, "failed", verdict[5:], seconds)
        return ExecResult(False, "failed", f"sandbox exit code {proc.returncode}", seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_many(programs: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024,
             workers: int | None = None, progress: bool = False, desc: str = "execute",
             allow_unsandboxed: bool = False) -> list[ExecResult]:
    """Run programs in parallel, one sandboxed process each (threads only wait on the children)."""
    from tqdm.auto import tqdm

    require_isolation(allow_unsandboxed)
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: run_program(p, timeout, memory_mb, allow_unsandboxed), programs)
        return list(tqdm(it, total=len(programs), desc=desc, disable=not progress, leave=False))
