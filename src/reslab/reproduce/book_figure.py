"""The deep network of LLMs-from-scratch (Raschka 2024) ch. 4.4, drawn from the code, without and with shortcuts.

The book's figure puts the plain five-layer network (left) beside the one with shortcut connections (right), each
shortcut adding a layer's input to its output where the shapes match. Here both come from tracing reslab's `mlp`
model (the book's `ExampleDeepNeuralNetwork`, layer sizes [3, 3, 3, 3, 3, 1]), so the drawing shows a `+` exactly
where the code adds, and is checked against the book's design: one identity residual around each 3 -> 3 layer
with shortcuts, none without.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from reslab.graph import audit, check_design
from reslab.graph.design import DesignCheck
from reslab.graph.diagram import Diagram
from reslab.graph.diagram.svg import side_by_side
from reslab.io import atomic_write
from reslab.reproduce.common import print_verdict
from reslab.reproduce.deep_mlp import LAYER_SIZES

CLAIM = "LLMs-from-scratch ch. 4.4: shortcuts add each layer's input to its output where shapes match"
TITLES = {False: "without shortcut connections", True: "with shortcut connections"}


def book_design(shortcut: bool, sizes: list[int]) -> dict:
    """The figure's residuals: around each layer whose input and output sizes match, or none at all."""
    if not shortcut:
        return {"residuals": []}
    return {"residuals": [{"around": f"layers.{i}", "kind": "identity", "count": 1}
                          for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])) if n_in == n_out]}


def check(shortcut: bool, sizes: list[int] | None = None) -> DesignCheck:
    """The traced `mlp` model (on the meta device) against the book's design for it."""
    from reslab.models import build_model

    sizes = list(sizes or LAYER_SIZES)
    with torch.device("meta"):
        model = build_model("mlp", layer_sizes=sizes, shortcut=shortcut)
    result = audit(model, (torch.zeros(1, sizes[0], device="meta"),), target=TITLES[shortcut])
    return check_design(result, book_design(shortcut, sizes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", type=Path,
                        help="where to write book-figure.svg (default runs/reproduce/book-figure)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / "reproduce" / "book-figure"
    plain, shortcut = check(False), check(True)
    figure = side_by_side([Diagram.from_audit(c.audit, unroll=True).svg() for c in (plain, shortcut)])
    path = out / "book-figure.svg"
    atomic_write(path, figure.encode("utf-8"))
    if not args.json:
        print(f"wrote {path} (left: {TITLES[False]}, right: {TITLES[True]})")
    counts = {"without_shortcut": len(plain.audit.residuals), "with_shortcut": len(shortcut.audit.residuals)}
    kinds = sorted({r.kind for r in shortcut.audit.residuals})
    around = ", ".join(w for r in shortcut.audit.residuals for w in r.wraps) or "nothing"
    measured = (f"the traced code has {counts['with_shortcut']} residuals ({', '.join(kinds) or 'none'}; around "
                f"{around}) with shortcuts and {counts['without_shortcut']} without")
    return print_verdict(args, CLAIM, measured, plain.ok and shortcut.ok, {**counts, "figure": str(path)})
