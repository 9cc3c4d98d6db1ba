"""No module-level import cycles inside pathssl_cli: every module imports on its own, in any order.

A cycle works or fails depending on which of its modules is imported first (issue 11: a fresh
`import pathssl_cli.segment.metrics_pannuke` raised ImportError while `import pathssl_cli.segment.metrics`
worked), so a test that imports modules in one order can miss it. Two checks: a static one that names the cycle,
and a dynamic one that imports each module first, with every pathssl_cli module forgotten in between.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pathssl_cli

PACKAGE = Path(pathssl_cli.__file__).parent


def _module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


def _top_level_imports(name: str, file: Path, known: set[str]) -> set[str]:
    """pathssl_cli modules imported when `name` is executed (function bodies and TYPE_CHECKING excluded)."""
    found: set[str] = set()
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
            elif isinstance(node, ast.If | ast.Try | ast.With):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(ast.parse(file.read_text()).body)
    # Importing a.b.c executes a and a.b first; a package importing its own submodule is not a cycle.
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycles.append([*stack[stack.index(child):], child])
            elif child not in state:
                visit(child)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle() -> None:
    modules = _module_names()
    graph = {name: _top_level_imports(name, file, set(modules)) for name, file in modules.items()}
    assert "pathssl_cli.segment.metrics_pannuke" in graph  # the walk sees the package
    assert _cycles(graph) == []


_IMPORT_EACH_FIRST = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "pathssl_cli" or m.startswith("pathssl_cli.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional extra that is not installed is not a cycle
        if (exc.name or "").startswith("pathssl_cli"):
            failed.append(f"{name}: {exc!r}")
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
print("\\n".join(failed))
"""


@pytest.mark.slow  # re-executes every module ~100 times: about 15 s of CPU
def test_every_module_imports_first() -> None:
    # One interpreter, but every pathssl_cli module is forgotten before the next is imported, so each is
    # imported as a fresh interpreter would; third-party libraries stay loaded, which keeps this cheap.
    names = sorted(n for n in _module_names() if not n.endswith("__main__"))
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *names], capture_output=True, text=True,
                          timeout=600, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ""


def _all_imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Every pathssl_cli module `name` imports anywhere: at the top, inside functions and under TYPE_CHECKING.

    A deferred import avoids the ImportError of a cycle but not the cycle: the layers still reach up and down
    into each other (issue 20 §7). So the house is checked with these too."""
    found: set[str] = set()
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def test_layers_read_top_down_even_through_deferred_imports() -> None:
    modules = _module_names()
    graph = {name: _all_imports(name, file, set(modules)) for name, file in modules.items()}
    assert "pathssl_cli.specs.study" in graph["pathssl_cli.study.plan"]  # the walk sees function-level imports
    assert _cycles(graph) == []
