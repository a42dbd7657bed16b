"""docs/architecture.md is correct: every path, module and `file.py:NAME` table it names exists, and its package
diagram shows every package and top-level module of reslab (data/ and lens/ included)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "reslab"
DOC = ROOT / "docs" / "architecture.md"
TEXT = DOC.read_text()
SPANS = sorted(set(re.findall(r"`([^`\n]+)`", TEXT)))
DIAGRAM = re.search(r"## Packages\n.*?```\n(.*?)```", TEXT, re.S).group(1)
TOP_LEVEL = {path.stem for path in PACKAGE.glob("*.py")} | {path.name for path in PACKAGE.iterdir()
                                                          if (path / "__init__.py").exists()}


def find(path: str) -> list[Path]:
    """Where a path the doc names is: under src/reslab, the repository or docs/ (a `*` matches a folder)."""
    return [hit for base in (PACKAGE, ROOT, ROOT / "src", ROOT / "docs") for hit in base.glob(path.rstrip("/"))]


def is_placeholder(span: str) -> bool:
    """`residual/<name>.py`, `FILE.py:CALLABLE`, `runs/<scheme>-L<depth>-s<seed>/`: a pattern, not a name."""
    path = span.split(":")[0]
    return "<" in span or " " in span or any(part.isupper() for part in re.split(r"[/.]", path) if part)


def defines(path: Path, name: str) -> bool:
    """Is `name` assigned, or a function or class defined, at the top level of the module at `path`?"""
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) or \
                isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
    return False


def tables() -> list[str]:
    return [span for span in SPANS if re.fullmatch(r"[\w/]+\.py:\w+", span) and not is_placeholder(span)]


def paths() -> list[str]:
    spans = [span for span in SPANS if re.fullmatch(r"[\w*./-]+(/|\.py|\.md)", span) and not is_placeholder(span)]
    return spans + re.findall(r"[\w*/]+(?:/|\.py)(?=[\s,)]|$)", DIAGRAM)


def modules() -> list[str]:
    """Dotted names whose first part is reslab or one of its top-level modules: `train.trainer.prepare`."""
    dotted = [span.removesuffix("()") for span in SPANS if re.fullmatch(r"[a-z_]\w*(\.\w+)+(\(\))?", span)]
    return [name for name in dotted if name.split(".")[0] in TOP_LEVEL | {"reslab"} and not name.endswith(".py")]


def resolve(name: str) -> object:
    """Import the longest module prefix of `name` (under reslab) and read the rest as attributes."""
    parts = name.removeprefix("reslab.").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module("reslab." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ModuleNotFoundError(name)


def test_the_doc_is_parsed():
    assert "contracts.py:LensModel" in tables() and "registry.py:SCHEMES" in tables()
    assert {"data/sources.py", "tests/test_architecture.py", "lens/", "*/commands.py"} <= set(paths())
    assert {"train.trainer.prepare", "graph.targets", "nn.Block"} <= set(modules())
    assert is_placeholder("residual/<name>.py") and is_placeholder("FILE.py:CALLABLE")


@pytest.mark.parametrize("table", tables())
def test_every_table_it_names_is_where_it_says(table):
    file, name = table.split(":")
    hits = find(file)
    assert hits, f"docs/architecture.md names {table}, but there is no {file}"
    assert any(defines(hit, name) for hit in hits), f"docs/architecture.md names {table}, but {file} defines no {name}"


@pytest.mark.parametrize("path", sorted(set(paths())))
def test_every_path_it_names_exists(path):
    assert find(path), f"docs/architecture.md names {path}, which does not exist"


@pytest.mark.parametrize("name", modules())
def test_every_module_it_names_exists(name):
    resolve(name)


def test_the_diagram_shows_every_package_and_module():
    shown = set(re.findall(r"[\w]+(?=/|\.py)", DIAGRAM))
    assert {"data", "lens"} <= shown
    assert not TOP_LEVEL - shown, f"not in the diagram of docs/architecture.md: {sorted(TOP_LEVEL - shown)}"
