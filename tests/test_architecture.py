"""The shape of the code, read from its source with `ast`. Every import statement counts, wherever it is (module
level, inside a function, under `if TYPE_CHECKING:`): the modules form no import cycle, no module imports from a
layer above its own (the layers of docs/architecture.md, in `LAYERS`), the library never imports the command line,
no module but `reslab._torch_compat` names a private torch member, and no function is 60 lines or longer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
MAX_FUNCTION_LINES = 59
TORCH_COMPAT = "reslab._torch_compat"
PRIVATE_TENSOR_MEMBERS = frozenset({"_base", "_version", "_cdata", "_typed_storage", "_grad_fn"})  # on any receiver

# Bottom to top: a module may import modules of its own layer and the layers below it, never above
# (docs/architecture.md, "Packages"). A name is a module or a package (then all of it); the CLI layer is `is_cli`.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("base", frozenset({"reslab", "reslab.errors", "reslab.io", "reslab.io", "reslab.io", "reslab.checks",
                        "reslab.registry", "reslab.heap", "reslab.processes", "reslab.contracts", "reslab.metrics",
                        "reslab.stats", "reslab.display", TORCH_COMPAT})),
    ("parts", frozenset({"reslab.residual", "reslab.nn", "reslab.probe"})),
    ("models", frozenset({"reslab.models"})),
    ("services", frozenset({"reslab.rundir", "reslab.ablationdir", "reslab.ablation_summary", "reslab.memory",
                            "reslab.data", "reslab.interop"})),
    ("engines", frozenset({"reslab.train", "reslab.graph", "reslab.testing"})),
    ("lens", frozenset({"reslab.lens", "reslab.runs"})),
    ("report", frozenset({"reslab.report"})),
    ("ablate", frozenset({"reslab.ablate"})),
    ("reproduce", frozenset({"reslab.reproduce"})),
    ("cli", frozenset()),
)
# (importer, imported) pairs excused from the cycle and layer checks. Empty, and kept empty: fix the import instead.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in FILES}


def is_cli(module: str) -> bool:
    """The command-line layer: argument parsing and handlers. `reslab.bench` holds both a library function and its
    command, so it counts as CLI (it may import the CLI)."""
    return module in {"reslab.cli", "reslab.cli_args", "reslab.__main__", "reslab.bench"} or \
        module.endswith(".commands")


def is_forbidden_for_library(module: str) -> bool:
    return module in {"reslab.cli", "reslab.cli_args", "reslab.__main__"} or module.endswith(".commands")


def layer_of(module: str) -> int:
    """The index in `LAYERS` of a reslab module (the most specific name that covers it)."""
    if is_cli(module):
        return len(LAYERS) - 1
    for prefix in (module, *(".".join(module.split(".")[:n]) for n in range(module.count("."), 0, -1))):
        for index, (_, names) in enumerate(LAYERS):
            if prefix in names:
                return index
    raise KeyError(f"{module} is in no layer: add it (or its package) to LAYERS in tests/test_architecture.py and to "
                   "the diagram in docs/architecture.md")


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it is."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _targets(node: ast.stmt, module: str, is_package: bool) -> list[str]:
    """The modules an import statement loads (a `from X import name` of a submodule names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def import_graph() -> dict[str, list[str]]:
    """module -> the reslab modules it imports, at any place in its source."""
    graph: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {target for node in _imports(tree) for target in _targets(node, module, path.name == "__init__.py")}
        graph[module] = sorted(t for t in targets if t.split(".")[0] == "reslab" and t != module
                               and (module, t) not in ALLOWED)
    return graph


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle, as [a, b, ..., a], through each group of mutually importing modules (each strongly connected
    component of more than one module); [] when there is none."""
    return [_shortest_cycle(graph, component) for component in _components(graph) if len(component) > 1]


def _components(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of the graph, each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, list[str]], component: list[str]) -> list[str]:
    """The shortest way from the component's first module back to itself (breadth first, inside the component)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for nxt in graph.get(node, []):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt in members and nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_the_graph_sees_every_import():
    graph = import_graph()
    assert "reslab.errors" in graph["reslab.cli"]
    assert "reslab.ablate.executors" in graph["reslab.ablate.grid"]
    assert "reslab.cli_args" in graph["reslab.cli"]  # inside a function
    assert "reslab.models" in graph["reslab.memory"]  # inside a function
    assert find_cycles({"a": ["b"], "b": ["c", "d"], "c": ["a"], "d": ["d"], "e": ["f"], "f": ["e"]}) == [
        ["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": ["b"], "b": []}) == []


def test_the_allow_list_is_empty():
    assert ALLOWED == frozenset(), "fix the import instead of excusing it"


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_from_a_higher_layer():
    offences = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                for module, targets in import_graph().items() for target in targets
                if target in MODULES and layer_of(target) > layer_of(module)]
    assert not offences, "\n".join(offences)


def test_the_library_never_imports_the_command_line():
    offences = [f"{module} imports {target}" for module, targets in import_graph().items() if not is_cli(module)
                for target in targets if is_forbidden_for_library(target)]
    assert not offences, "\n".join(offences)


def private_torch_names(tree: ast.Module) -> list[str]:
    """Private torch members a module names: `torch._x` and `torch.a._y` (through any alias of a torch module),
    `import torch._x`, `from torch import _x`, `getattr(<torch module>, name)` with a private or computed name, and
    the private tensor members in `PRIVATE_TENSOR_MEMBERS` on anything."""
    aliases = {"torch": "torch"}
    found = []
    for node in _imports(tree):
        for alias in node.names:
            full = alias.name if isinstance(node, ast.Import) else f"{node.module or ''}.{alias.name}"
            if full.split(".")[0] == "torch":
                bound = full if alias.asname or isinstance(node, ast.ImportFrom) else "torch"
                aliases[alias.asname or alias.name.split(".")[0]] = bound
                found += [full] if _private(full) else []
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        name = _dotted(node, aliases) if id(node) not in inner else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and (owner := _dotted(node.args[0], aliases)):
            key = node.args[1]
            name = f"{owner}.{key.value if isinstance(key, ast.Constant) else '_<computed>'}"
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_TENSOR_MEMBERS:
            name = f"Tensor.{node.attr}"
        if name and _private(name):
            found.append(f"line {node.lineno}: {name}")
    return found


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`a.b.c` with `a` a torch alias, spelled from `torch`; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.endswith("__") for part in name.split("."))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != TORCH_COMPAT))
def test_private_torch_lives_only_in_the_compat_module(module):
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = private_torch_names(tree)
    assert not found, f"{module} uses private torch names (wrap them in {TORCH_COMPAT}): {found}"


def test_the_private_torch_check_sees_each_spelling():
    source = ("import torch\nimport torch._inductor\nimport torch.nn as nn\nfrom torch import _C\n"
              "torch._foreach_norm(x)\nnn.functional._pad(x)\ngetattr(torch.cpu, '_is_amx_tile_supported')\n"
              "torch.ops.mkldnn._is_mkldnn_bf16_supported()\nself._private()\ntorch.nn.Module.__call__\n"
              "getattr(torch, 'float32')\nx._base\n")
    found = {entry.split(": ")[-1] for entry in private_torch_names(ast.parse(source))}
    assert found == {"torch._inductor", "torch._C", "torch._foreach_norm", "torch.nn.functional._pad",
                     "torch.cpu._is_amx_tile_supported", "torch.ops.mkldnn._is_mkldnn_bf16_supported",
                     "Tensor._base"}


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


@pytest.mark.parametrize("path", [pytest.param(path, id=str(path.relative_to(SRC))) for path in FILES])
def test_no_function_is_60_lines_or_longer(path):
    assert not _long_functions(path), _long_functions(path)
