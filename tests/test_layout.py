"""The package's layout: no import cycles, and deprecated names that still work for one release."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sassha_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def test_no_import_cycles_in_the_package():
    """Lazy imports inside functions count too: a cycle is a design smell even when it runs."""
    graph = _imports()
    # A package's __init__ importing its own submodules is not a cycle of jobs.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".") or not t}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_deprecated_strategy_name_still_works():
    import sassha_dist.distributed as distributed

    with pytest.warns(DeprecationWarning, match="use Replicated"):
        alias = distributed.DataParallel
    assert alias is distributed.Replicated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from sassha_dist.distributed import Replicated  # noqa: F401  (the new name warns nothing)
