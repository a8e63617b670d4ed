"""Running generated programs safely: one process each, bounded in time, memory and reach.

Each program runs in a fresh ``python -I -B`` (no site-packages, no user environment) with:

- an empty temporary working directory, removed afterwards, and a clean environment;
- a wall-clock limit (the whole process group is killed with SIGKILL when it passes) and an
  ``RLIMIT_CPU`` limit; ``RLIMIT_AS`` for memory, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and
  ``RLIMIT_NPROC`` (root drops to ``nobody`` first where nobody can read the standard library,
  since the kernel does not apply NPROC to root);
- when ``unshare`` works here, new network and PID namespaces: no network interface at all, and
  every process the program might start dies with it;
- inside, an audit hook (see ``_sandbox_child.py``) that refuses sockets, forks, subprocesses,
  exec, ctypes and file writes/deletes outside the working directory.

A program passes only if it runs to the end and the child reports a per-run nonce; a program
that exits early (``sys.exit(0)``) does not pass.
"""

from __future__ import annotations

import json
import os
import secrets
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

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_NOBODY = 65534


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed", "failed" or "timeout"
    detail: str
    seconds: float


@lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that gives a child its own network and PID namespaces here,
    or () where that is not permitted (containers often forbid it)."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    base = (exe, "--net", "--pid", "--fork", "--kill-child")
    for prefix in (base, base + ("--user", "--map-root-user")) if os.geteuid() == 0 else \
            (base + ("--user", "--map-root-user"),):
        try:
            r = subprocess.run(list(prefix) + ["true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return prefix
    return ()


def isolation() -> list[str]:
    """What protects the evaluator here (recorded with the results)."""
    out = ["subprocess", "wall-clock kill", "rlimits(cpu,as,fsize,nproc,nofile)", "audit-hook",
           "empty-tmp-cwd", "clean-env"]
    if namespace_prefix():
        out.append("netns+pidns")
    return out


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` (source text) in the sandbox; passed only if it runs to completion."""
    nonce = secrets.token_hex(8)
    tmp = tempfile.mkdtemp(prefix="llama-pretrain-exec-")
    if os.geteuid() == 0:
        os.chown(tmp, _NOBODY, _NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    cmd = [*namespace_prefix(), sys.executable, "-I", "-B", CHILD, nonce]
    job = json.dumps({"program": program, "cpu_seconds": max(1, int(timeout + 0.999)),
                      "memory_mb": memory_mb})
    start = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True)
        try:
            out, _ = proc.communicate(job.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecResult(False, "timeout", f"timed out after {timeout:g} s", time.monotonic() - start)
        finally:
            _kill_group(proc)  # anything it left behind in its process group
        text = out.decode("utf-8", "replace").strip().splitlines()
        last = text[-1] if text else ""
        seconds = time.monotonic() - start
        if proc.returncode == 0 and last == f"PASS {nonce}":
            return ExecResult(True, "passed", "", seconds)
        if last.startswith("FAIL "):
            return ExecResult(False, "failed", last[5:], seconds)
        sig = -proc.returncode if proc.returncode and proc.returncode < 0 else None
        why = f"killed by {signal.Signals(sig).name}" if sig else f"exit code {proc.returncode}"
        return ExecResult(False, "failed", why, seconds)
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
             workers: int | None = None, progress: bool = False, desc: str = "execute") -> list[ExecResult]:
    """Run programs in parallel, one sandboxed process each (threads only wait on the children)."""
    from tqdm.auto import tqdm

    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: run_program(p, timeout, memory_mb), programs)
        return list(tqdm(it, total=len(programs), desc=desc, disable=not progress, leave=False))
