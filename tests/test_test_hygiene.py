"""Tests share their helpers through tests/helpers/ (on the import path by pytest's pythonpath
setting): no test file edits sys.path, and none imports another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SOURCES = sorted([*TESTS.glob("*.py"), *(TESTS / "helpers").glob("*.py")])


def sys_path_uses(tree: ast.AST) -> list[int]:
    """Lines that touch ``sys.path`` (insert, append, assign...)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def _is_test_module(name: str) -> bool:
    return any(part.startswith("test_") or part == "conftest" for part in name.split("."))


def imports_of_test_modules(tree: ast.AST) -> list[int]:
    """Lines that import a ``test_*`` module or conftest (``import test_x``, ``from test_x import y``,
    ``from tests import test_x``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [alias.name for alias in node.names]
        else:
            continue
        if any(_is_test_module(name) for name in names):
            lines.append(node.lineno)
    return lines


def offenders(check) -> list[str]:
    out = []
    for path in SOURCES:
        lines = check(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        out += [f"{path.relative_to(TESTS.parent)}:{line}" for line in lines]
    return out


def test_the_checks_find_what_they_look_for():
    source = ast.parse("import sys\nsys.path.insert(0, 'x')\nimport test_a\nfrom test_b import f\n"
                       "from tests import test_c\nfrom helpers.runs import read_metrics\nimport torch.testing\n")
    assert sys_path_uses(source) == [2]
    assert imports_of_test_modules(source) == [3, 4, 5]
    assert len(SOURCES) > 10 and TESTS / "helpers" / "runs.py" in SOURCES


def test_no_test_file_edits_sys_path():
    assert offenders(sys_path_uses) == [], "import shared helpers from tests/helpers/ instead"


def test_no_test_file_imports_another_test_module():
    assert offenders(imports_of_test_modules) == [], "move what is shared into tests/helpers/"
