"""A small built-in corpus from what ships with Python, for the default training job.

Two sources, mirroring the paper's "up-sample the most factual sources":

* ``stdlib_code``: the standard library's ``.py`` files (tests, IDLE, site-packages left out),
  one document per module;
* ``stdlib_docs``: English documentation: the reference topics of ``pydoc_data.topics`` and, per
  module, its docstrings (module, classes, functions), read with ``ast`` (nothing is imported).

``write_builtin_corpus`` writes them as JSONL plus a TOML data config with weights 1.0 (code) and
2.0 (docs). Quality rules are off for both (they are written for web prose, not code or API
docs); normalisation and dedup stay on. About 3 MB in all, so the default job stays fast.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

from ..fsutil import atomic_file

CODE_BUDGET = 2_000_000  # characters
DOCS_BUDGET = 1_200_000
MAX_FILE_CHARS = 60_000
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
             "turtledemo", "lib2to3", "ensurepip", "tkinter", "pydoc_data", "encodings", "msilib"}


def _stdlib_files() -> list[Path]:
    root = sysconfig.get_paths()["stdlib"]
    out: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "test_")))
        out.extend(Path(dirpath) / f for f in files if f.endswith(".py") and not f.startswith("test_"))
    return sorted(out)


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> str:
    chunks = []
    doc = ast.get_docstring(tree)
    if doc:
        chunks.append(f"Module {module}\n\n{doc}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            d = ast.get_docstring(node)
            if d:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                chunks.append(f"{module}.{node.name} ({kind})\n\n{d}")
    return "\n\n".join(chunks)


def builtin_documents(max_docs: int | None = None) -> tuple[list[dict], list[dict]]:
    """(code documents, documentation documents), each ``{"text", "id"}``, deterministic for a
    given Python version."""
    code, docs = [], []
    code_chars = docs_chars = 0
    topics: dict[str, str]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= 200 and docs_chars < DOCS_BUDGET // 2:
            docs.append({"id": f"topic:{name}", "text": text})
            docs_chars += len(text)
    for path in _stdlib_files():
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not src.strip() or len(src) > MAX_FILE_CHARS:
            continue
        module = _module_name(path)
        if code_chars < CODE_BUDGET:
            code.append({"id": module, "text": src})
            code_chars += len(src)
        if docs_chars < DOCS_BUDGET:
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                continue
            d = _docstrings(tree, module)
            if len(d) >= 200:
                docs.append({"id": f"doc:{module}", "text": d})
                docs_chars += len(d)
        if code_chars >= CODE_BUDGET and docs_chars >= DOCS_BUDGET:
            break
    if max_docs is not None:
        code, docs = code[:max_docs], docs[:max_docs]
    return code, docs


def write_builtin_corpus(out_dir: str | Path, max_docs: int | None = None) -> Path:
    """Write ``stdlib_code.jsonl``, ``stdlib_docs.jsonl`` and ``builtin_data.toml`` (weights 1.0 and
    2.0) under ``out_dir``; returns the config's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code, docs = builtin_documents(max_docs)
    for name, items in (("stdlib_code.jsonl", code), ("stdlib_docs.jsonl", docs)):
        with atomic_file(out / name, "w") as fh:
            for it in items:
                fh.write(json.dumps(it, ensure_ascii=False) + "\n")
    config = f"""\
# Built-in corpus: Python {sys.version_info.major}.{sys.version_info.minor} standard library.
# Written by llama_pretrain.data.builtin.write_builtin_corpus; paths are relative to this file.
val_fraction = 0.02
seed = 0

[[sources]]
name = "stdlib_code"
paths = ["stdlib_code.jsonl"]
weight = 1.0
quality = false

[[sources]]
name = "stdlib_docs"
paths = ["stdlib_docs.jsonl"]
weight = 2.0          # up-sampled: the "most factual" source, seen twice per pass
quality = false
"""
    cfg = out / "builtin_data.toml"
    with atomic_file(cfg, "w") as fh:
        fh.write(config)
    return cfg
