"""The package's import graph: no loops, and layers that only point down.

Every import counts, including those inside functions (the CLI defers heavy imports), so a loop
hidden behind a lazy import fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "llama_pretrain"
SRC = Path(__file__).resolve().parents[1] / "src" / PKG

# Lower layers never import higher ones. A module's layer is that of its longest listed prefix.
LAYERS = [
    ("base", ["errors", "config", "config_fields", "devices", "fsutil"]),
    ("core", ["model", "losses", "tokenizer", "generate", "data", "compute"]),
    ("interop", ["interop"]),
    ("stages", ["train", "eval"]),
    ("cli", ["cli", "commands", "__main__", "config_docs"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PKG, *parts])


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` counts x when x is a module)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module itself
                t = t.rpartition(".")[0]
            if t and t.startswith(PKG) and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # The package root only re-exports the public API; importing a submodule does not make it a
    # dependency of that submodule's callers.
    return {n: {t for t in imports_of(n, p, known) if t != PKG} for n, p in mods.items() if n != PKG}


def layer_of(name: str) -> int:
    rel = name.removeprefix(PKG + ".")
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (rel == prefix or rel.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph()) == []


def test_layers_point_down():
    wrong = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
             for a, targets in sorted(graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert wrong == []


def test_the_checker_sees_loops_and_lazy_imports(tmp_path):
    # The checker itself could pass by finding nothing: it must find a loop made of lazy imports.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = graph()
    assert f"{PKG}.train.loop" in g[f"{PKG}.commands.train"]  # imported inside a function there
    assert f"{PKG}.model" in g[f"{PKG}.train.loop"]


# Readers that catch RecursionError themselves (on the per-line hot path of data prepare and eval).
_OWN_JSON_GUARD = {"config.py", "data/sources.py", "eval/tasks/data.py"}


def test_json_is_parsed_through_the_guarded_reader():
    # json.loads recurses per nested array / object: a file nested thousands deep is a
    # RecursionError traceback unless it goes through config.parse_json / read_json_object.
    bare = [f"{p.relative_to(SRC)}:{n}" for p in sorted(SRC.rglob("*.py"))
            if str(p.relative_to(SRC)) not in _OWN_JSON_GUARD
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if "json.loads(" in line or "json.load(" in line]
    assert bare == [], bare
