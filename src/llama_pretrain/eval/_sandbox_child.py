"""The process that runs one generated program (started by ``sandbox.py``; standard library only).

Its arguments are ``cpu_seconds memory_mb work_mb isolate drop_to_nobody`` (integers; the last
two 0 or 1), the program's source comes on stdin (until EOF), and it writes one verdict line on
stdout. It is two processes (and imports little: its start-up is paid per program):

- the supervisor (this one; PID 1 of the sandbox's PID namespace when isolated). With
  ``isolate`` it first builds the mount namespace ``unshare`` gave it: a size-limited tmpfs on the
  working directory, the interpreter's standard library made reachable for ``nobody``, and every
  other mount read-only (checked afterwards; any failure aborts). It then makes itself
  non-dumpable (no ptrace, no ``/proc/1/fd`` for the worker), forks the worker, and alone holds
  the verdict channel (its stdout).
- the worker, which closes every descriptor but two pipes to the supervisor, sets rlimits, drops
  to ``nobody`` (required when ``drop_to_nobody``: as root, RLIMIT_NPROC would not bind) or, as
  root of a user namespace, enters a nested one, installs an audit hook (defence in depth only,
  not the isolation) and runs the program.

The verdict: when the program's code (its tests included) has run to the end, the worker says
so; only then does the supervisor make a one-time secret and send it; the worker must echo it and
exit 0. Nothing the program can see before that (argv, environment, descriptors) carries it.
"""

import ctypes
import functools
import os
import resource
import stat
import sys
from typing import Any

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
_KEPT_FLAGS = 2 | 4 | 8 | 1024 | 2048  # nosuid nodev noexec noatime nodiratime: same bits in statvfs
ST_RELATIME, MS_RELATIME = 4096, 1 << 21
CLONE_NEWUSER, PR_SET_DUMPABLE = 0x10000000, 4


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args) -> None:
    if getattr(_libc(), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")


# -- the mount namespace (supervisor, as root inside it) ---------------------------------------
def _mount(source, target, fstype, flags, data=None):
    def c(s):
        return None if s is None else os.fsencode(s)
    _libc_call("mount", c(source), c(target), c(fstype), flags, c(data))


def _mount_points() -> dict:
    """{reachable mount point: its per-mount options}, the topmost where several share a path
    (mountinfo lists mounts in order); a point under a mount we covered no longer exists."""
    out = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            f = line.split()
            point, *escaped = f[4].split("\\")  # mountinfo writes ' ' as \040
            point += "".join(chr(int(e[:3], 8)) + e[3:] for e in escaped)
            out[point] = f[5].split(",")
    return {p: opts for p, opts in out.items() if os.path.lexists(p)}


def _expose_to_nobody(path: str) -> None:
    """Make ``path`` reachable for any user: over its first ancestor that others cannot enter
    (``/root`` for a pyenv interpreter), a tmpfs holding only the way down to a bind of ``path``."""
    parts = path.split(os.sep)[1:]
    for i in range(1, len(parts)):
        blocked = os.sep + os.sep.join(parts[:i])
        if not os.stat(blocked).st_mode & stat.S_IXOTH:
            break
    else:
        return
    keep = os.open(path, os.O_PATH | os.O_DIRECTORY)
    _mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    os.makedirs(path, 0o755)
    _mount(f"/proc/self/fd/{keep}", path, None, MS_BIND | MS_REC)
    os.close(keep)


def _remount_read_only(point: str) -> None:
    f = os.statvfs(point).f_flag
    kept = (f & _KEPT_FLAGS) | (MS_RELATIME if f & ST_RELATIME else 0)
    _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def isolate(work: str, work_mb: int, owner: int | None) -> None:
    ids = f",uid={owner},gid={owner}" if owner is not None else ""
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={work_mb}m,mode=0700{ids}")
    os.chdir(work)  # the old cwd is the directory under the new mount
    if owner is not None:
        _expose_to_nobody(os.path.realpath(os.path.dirname(os.__file__)))
    for point in _mount_points():
        if point != work:
            _remount_read_only(point)
    writable = [p for p, opts in _mount_points().items() if p != work and "ro" not in opts]
    if writable:
        raise OSError(f"still writable: {writable}")


# -- the worker --------------------------------------------------------------------------------
def _limit(which, soft, hard=None):
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass


def _world_readable(path: str) -> bool:
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        try:
            if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _drop_to_nobody(required: bool) -> None:
    if os.geteuid() != 0 or not (required or _world_readable(os.path.dirname(os.__file__))):
        return
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except OSError:
        if required:
            raise


def _confine(job, keep: tuple) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    low, high = sorted(keep)
    for first, end in ((3, low), (low + 1, high), (high + 1, 1 << 16)):
        os.closerange(first, end)
    mem = job["memory_mb"] << 20
    cpu = job["cpu_seconds"]
    _limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    _limit(resource.RLIMIT_AS, mem)
    _limit(resource.RLIMIT_DATA, mem)
    _limit(resource.RLIMIT_FSIZE, 16 << 20)
    _limit(resource.RLIMIT_NPROC, 1)  # binds once the worker is not root
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_CORE, 0)
    _drop_to_nobody(job["drop_to_nobody"])
    if job["isolate"] and not job["drop_to_nobody"]:
        # Root of the sandbox's user namespace could remount it writable and reach the
        # supervisor; in a nested one its capabilities reach neither.
        _libc_call("unshare", CLONE_NEWUSER)
    sys.addaudithook(_audit_hook(os.path.realpath(os.getcwd())))


def _audit_hook(root: str):
    """Refuses the obvious (sockets, processes, ctypes, writes outside ``root``); bypassable."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn",
                        "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.setuid",
                        "pty.", "ctypes.", "_posixsubprocess", "resource.setrlimit",
                        "resource.prlimit", "webbrowser.", "os.startfile", "signal.pthread_kill")
    path_events = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
                   "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags",
                   "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.move",
                   "shutil.copyfile", "shutil.copytree", "os.mknod", "os.mkfifo"}
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(p) -> bool:
        if isinstance(p, int):
            return True
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
    return hook


def worker(job, tell: int, hear: int) -> None:
    """Runs the program; never returns. ``tell``/``hear``: pipes to and from the supervisor."""
    try:
        _confine(job, (tell, hear))
    except BaseException as e:  # noqa: BLE001 - a sandbox that cannot be built runs nothing
        os.write(tell, f"FAIL sandbox setup: {e}"[:300].encode() + b"\n")
        os._exit(1)
    program = job["program"]
    del job
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: BLE001 - any failure, SystemExit included, fails the program
        name = type(e).__name__
        if isinstance(e, SystemExit) and e.code in (0, None):
            name = "SystemExit(0) before the tests finished"
        os.write(tell, f"FAIL {name}: {str(e)[:200]}".replace("\n", " ").encode() + b"\n")
        os._exit(1)
    os.write(tell, b"DONE\n")
    os.write(tell, b"ECHO " + os.read(hear, 64) + b"\n")
    os._exit(0)


# -- the supervisor ----------------------------------------------------------------------------
def _verdict(pid: int, tell_r: int, hear_w: int) -> str:
    """PASS only if the worker finished the program, then echoed a secret made after that."""
    with os.fdopen(tell_r, "rb") as tell:
        said = tell.readline(512).decode("utf-8", "replace").rstrip("\n")
        echo = None
        if said == "DONE":
            secret = os.urandom(16).hex()
            try:
                os.write(hear_w, secret.encode())
                echo = tell.readline(512) == f"ECHO {secret}\n".encode()
            except BrokenPipeError:
                pass
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if echo and code == 0:
        return "PASS"
    if said.startswith("FAIL "):
        return said
    if code < 0:
        return f"FAIL killed by signal {-code}"
    return f"FAIL exit code {code} before the tests finished"


def main() -> None:
    names = ("cpu_seconds", "memory_mb", "work_mb", "isolate", "drop_to_nobody")
    job: dict[str, Any] = dict(zip(names, map(int, sys.argv[1:])))
    job["program"] = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    if job["isolate"]:
        try:
            isolate(os.path.realpath(os.getcwd()), job["work_mb"],
                    NOBODY if job["drop_to_nobody"] else None)
        except OSError as e:
            print(f"FAIL sandbox setup: {e}", flush=True)
            os._exit(3)
    tell_r, tell_w = os.pipe()
    hear_r, hear_w = os.pipe()
    sys.stdout.flush()
    _libc_call("prctl", PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace, no /proc/1/fd by the same uid
    pid = os.fork()
    if pid == 0:
        os.close(tell_r)
        os.close(hear_w)
        _libc_call("prctl", PR_SET_DUMPABLE, 1, 0, 0, 0)
        worker(job, tell_w, hear_r)
    os.close(tell_w)
    os.close(hear_r)
    print(_verdict(pid, tell_r, hear_w), flush=True)


if __name__ == "__main__":
    main()
