"""The process that runs one generated program (started by ``sandbox.py``; standard library only).

It reads ``{"program", "cpu_seconds", "memory_mb", "nonce"}`` as JSON on stdin, then, before the
program runs: sets resource limits (CPU, address space, file size, processes, open files), drops
root to ``nobody`` where it can, sends the program's stdout/stderr to /dev/null, and installs an
audit hook (PEP 578) that refuses sockets, subprocesses, forks, exec, ctypes, signals to other
processes, and any file write, delete, rename or permission change outside the working directory.
It reports on its original stdout: the nonce when the program finished, else the exception name.
"""

import json
import os
import resource
import sys


def _limit(which, soft, hard=None):
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass


def _world_readable(path: str) -> bool:
    # Dropping to nobody is only possible when nobody can still import the standard library.
    import stat
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def main() -> None:
    job = json.loads(sys.stdin.read())
    root = os.path.realpath(os.getcwd())
    report = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    mem = int(job["memory_mb"]) << 20
    cpu = int(job["cpu_seconds"])
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    _limit(resource.RLIMIT_AS, mem)
    _limit(resource.RLIMIT_DATA, mem)
    _limit(resource.RLIMIT_FSIZE, 16 << 20)
    _limit(resource.RLIMIT_NPROC, 1)  # not enforced for root: hence the uid drop and the hook
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_CORE, 0)
    if os.geteuid() == 0 and _world_readable(os.path.dirname(os.__file__)):
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:
            pass  # inside a user namespace that maps only root; the hook still applies

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn",
                        "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.setuid",
                        "pty.", "ctypes.", "_posixsubprocess", "resource.setrlimit",
                        "resource.prlimit", "webbrowser.", "os.startfile", "signal.pthread_kill")
    path_events = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
                   "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags",
                   "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.move",
                   "shutil.copyfile", "shutil.copytree", "os.mknod", "os.mkfifo"}
    realpath, fsdecode = os.path.realpath, os.fsdecode
    sep = os.sep

    def inside(p) -> bool:
        if isinstance(p, int):
            return True  # an already-open descriptor
        try:
            p = realpath(fsdecode(p))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + sep) or p == "/dev/null"

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writes and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)
    program = job["program"]
    del job
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: BLE001 - any failure, SystemExit included, fails the program
        name = type(e).__name__
        if isinstance(e, SystemExit) and e.code in (0, None):
            name = "SystemExit(0) before the tests finished"
        report.write(f"FAIL {name}: {str(e)[:200]}\n")
        report.flush()
        os._exit(1)
    report.write(f"PASS {sys.argv[1] if len(sys.argv) > 1 else ''}\n")
    report.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
