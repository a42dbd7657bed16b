"""The shape of the code, read from its source with `ast`: the library never imports the command line, module-level
imports form no cycle, and no function is 60 lines or longer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
MAX_FUNCTION_LINES = 59


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in FILES}


def is_cli(module: str) -> bool:
    """The command-line layer: argument parsing and handlers. `reslab.bench` holds both a library function and its
    command, so it counts as CLI (it may import the CLI), but the library may import it."""
    return module in {"reslab.cli", "reslab.cli_args", "reslab.__main__", "reslab.bench"} or \
        module.endswith(".commands")


def is_forbidden_for_library(module: str) -> bool:
    return module in {"reslab.cli", "reslab.cli_args", "reslab.__main__"} or module.endswith(".commands")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs when the module is imported (not inside a function, not under
    `if TYPE_CHECKING:`)."""
    found: list[tuple[ast.stmt, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, at_import))
            inside = at_import and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) \
                and not _is_type_checking(child)
            visit(child, inside)

    visit(tree, True)
    return found


def _targets(node: ast.stmt, module: str, is_package: bool) -> list[str]:
    """The reslab modules an import statement loads (a `from X import name` of a submodule names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def import_graph() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported reslab module, imported at module level)]."""
    graph: dict[str, list[tuple[str, bool]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = graph.setdefault(module, [])
        for node, at_import in _imports(tree):
            for target in _targets(node, module, path.name == "__init__.py"):
                if target.split(".")[0] == "reslab" and target != module:
                    edges.append((target, at_import))
    return graph


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the directed graph, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert ("reslab.errors", True) in graph["reslab.cli"]
    assert ("reslab.ablate.executors", True) in graph["reslab.ablate.grid"]
    assert ("reslab.cli_args", False) in graph["reslab.cli"]  # inside a function
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_the_library_never_imports_the_command_line():
    offences = [f"{module} imports {target}" for module, edges in import_graph().items() if not is_cli(module)
                for target, _ in edges if is_forbidden_for_library(target)]
    assert not offences, "\n".join(offences)


def test_module_level_imports_form_no_cycle():
    graph = {module: sorted({target for target, at_import in edges if at_import})
             for module, edges in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", [pytest.param(path, id=str(path.relative_to(SRC))) for path in FILES])
def test_no_function_is_60_lines_or_longer(path):
    assert not _long_functions(path), _long_functions(path)
