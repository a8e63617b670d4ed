"""The lint CI runs before the tests (README, "Two commands"): ruff over the tree and mypy over the
package, with pyproject.toml's settings. mypy's ``warn_unreachable`` is what finds statements after a
``return``; ruff has no such rule. These tests fail the suite on a finding even outside CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="ruff is in the test extra")
pytest.importorskip("mypy", reason="mypy is in the test extra")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"
MODULE = ROOT / "src" / "llama_pretrain" / "errors.py"  # standard library only: mypy checks it alone
DEAD_CODE = '''

def answer() -> int:
    return 42
    print("never runs")
'''


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def mypy(path: Path, cache: Path) -> subprocess.CompletedProcess:
    return run("mypy", "--config-file", str(CONFIG), "--cache-dir", str(cache), str(path))


def copy_of_module(tmp_path: Path, appended: str = "") -> Path:
    path = tmp_path / MODULE.name
    path.write_text(MODULE.read_text(encoding="utf-8") + appended, encoding="utf-8")
    return path


def test_mypy_reports_a_statement_after_a_return(tmp_path):
    clean = mypy(copy_of_module(tmp_path), tmp_path / "cache")
    assert clean.returncode == 0, clean.stdout + clean.stderr

    path = copy_of_module(tmp_path, DEAD_CODE)
    line = path.read_text(encoding="utf-8").splitlines().index('    print("never runs")') + 1
    # ruff, with the project's rules, sees nothing wrong here: mypy is the check that does
    ruff = run("ruff", "check", "--config", str(CONFIG), str(path))
    assert ruff.returncode == 0, ruff.stdout
    dead = mypy(path, tmp_path / "cache")
    assert dead.returncode == 1, dead.stdout + dead.stderr
    assert f"{path.name}:{line}: error: Statement is unreachable  [unreachable]" in dead.stdout, dead.stdout


def test_ruff_reports_an_unused_import(tmp_path):
    path = copy_of_module(tmp_path, "\n\nimport os\n")
    result = run("ruff", "check", "--config", str(CONFIG), "--output-format", "concise", str(path))
    assert result.returncode == 1
    assert "F401" in result.stdout and "`os` imported but unused" in result.stdout, result.stdout


def test_ruff_passes_on_the_tree():
    result = run("ruff", "check", "--output-format", "concise", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
