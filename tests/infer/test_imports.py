"""The import graph of the packages: infer/ has no import cycle and never imports train/.

Every import counts, the ones inside functions too: a cycle that only function-level imports
keep from failing is still two modules that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, module: str, known: set[str] = frozenset()) -> set[str]:
    """Every module name `path` imports, anywhere in the file, relative imports resolved.

    `from a import b` names the module a.b when that is one of `known`, else the module a.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                names.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return names


def internal_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports by name. (Importing a.b also runs a's
    __init__; that is Python's doing, not a dependency the importing module chose.)"""
    modules = modules_of(package)
    return {module: {name for name in imported_names(path, module, set(modules)) if name in modules and name != module}
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["infer", "train"])
def test_no_import_cycle(package):
    cycle = find_cycle(internal_imports(package))
    assert cycle is None, f"import cycle in {package}/: {' -> '.join(cycle)}"


def test_infer_never_imports_train():
    found = [f"{module} imports {name}" for module, path in modules_of("infer").items()
             for name in imported_names(path, module) if name == "train" or name.startswith("train.")]
    assert not found, "infer/ must not import train/ (train depends on infer): " + "; ".join(sorted(found))


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import h\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nimport pkg.b\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    assert imported_names(pkg / "a.py", "pkg.a", known) == {"pkg.b"}
    assert imported_names(pkg / "sub" / "__init__.py", "pkg.sub", known) == {"pkg.sub.c"}
    assert imported_names(pkg / "sub" / "c.py", "pkg.sub.c", known) == {"pkg.a", "pkg.b"}
    (pkg / "d.py").write_text("from . import a, sub\nfrom .sub import c\n")
    assert imported_names(pkg / "d.py", "pkg.d", known) == {"pkg.a", "pkg.sub", "pkg.sub.c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
