"""`reslab diagram`: the architecture drawn from the traced computation, as SVG (drawn by reslab), Mermaid or DOT.

Because the diagram is built from the same trace as the audit, it shows a skip edge exactly where the code adds a
stream to a function of itself, and nowhere else.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch.nn as nn

from reslab.errors import ReslabError
from reslab.graph.audit import Audit, audit
from reslab.graph.design import DesignCheck, check_design, load_design
from reslab.graph.diagram.dot import graphviz_svg, render_dot
from reslab.graph.diagram.mermaid import render_mermaid
from reslab.graph.diagram.overlay import overlay_design
from reslab.graph.diagram.svg import render_svg
from reslab.graph.diagram.view import View, build_view, fold
from reslab.graph.residuals import KINDS
from reslab.io import atomic_write

FORMATS = {".svg": "svg", ".mmd": "mermaid", ".dot": "dot"}


class Diagram:
    """A drawable view of one traced model. In Jupyter it shows itself as SVG."""

    def __init__(self, view: View, subtitle: str = ""):
        self.view = view
        self.subtitle = subtitle

    @classmethod
    def from_audit(cls, result: Audit, depth: int = 1, unroll: bool = False,
                   design: DesignCheck | None = None) -> Diagram:
        """The diagram of an audit; with `design` (see `reslab.graph.design.check_design`), the design's claims the
        code lacks are drawn as dashed red skips and residuals no claim covers are highlighted."""
        if depth < 0:
            raise ReslabError(f"--depth must be 0 or more, got {depth}")
        kinds = Counter(r.kind for r in result.residuals)
        by_kind = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
        residuals, blocks = len(result.residuals), len(result.blocks)
        subtitle = (f"{result.model} · {residuals} residual{'' if residuals == 1 else 's'}" +
                    (f" ({by_kind})" if by_kind else "") + f" · {blocks} block{'' if blocks == 1 else 's'}" +
                    f" · dead: {', '.join(result.dead) or 'none'}")
        view = build_view(result, depth=depth, unroll=True)
        if design is not None:  # before folding, so blocks that differ in what the design says stay apart
            view = overlay_design(view, design)
            done = len(design.results) - len(design.missing)
            subtitle += (f" · design: {done} of {len(design.results)} claims implemented, "
                         f"{len(design.unclaimed)} unclaimed")
        return cls(view if unroll else fold(view), subtitle)

    def svg(self) -> str:
        return render_svg(self.view, self.subtitle)

    def mermaid(self) -> str:
        return render_mermaid(self.view)

    def dot(self) -> str:
        return render_dot(self.view)

    def save(self, path: str | Path, engine: str = "builtin") -> Path:
        """Write the diagram in the format its suffix names (.svg, .mmd, .dot)."""
        path = Path(path)
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise ReslabError(f"cannot tell the diagram format from {path.name!r}; name the file .svg, .mmd or .dot")
        if engine not in ("builtin", "dot"):
            raise ReslabError(f"unknown engine {engine!r}; choose builtin or dot")
        if kind == "svg":
            text = graphviz_svg(self.dot()) if engine == "dot" else self.svg()
        else:
            text = self.mermaid() if kind == "mermaid" else self.dot()
        atomic_write(path, text.encode("utf-8"))  # a full disk leaves the old diagram whole
        return path

    def _repr_svg_(self) -> str:
        return self.svg()


Audit.draw = Diagram.from_audit  # what `Audit.diagram()` calls (audit.py cannot import this module: a cycle)


def diagram(model: nn.Module, example_inputs: Any, depth: int = 1, unroll: bool = False,
            target: str | None = None, design: Any = None) -> Diagram:
    """Trace `model` on `example_inputs` and draw it; with `design` (a design file or dict, see
    `reslab.graph.design`), draw the claims the code lacks and highlight the residuals no claim covers."""
    design = load_design(design) if design is not None else None
    result = audit(model, example_inputs, target)
    check = check_design(result, design) if design is not None else None
    return Diagram.from_audit(result, depth=depth, unroll=unroll, design=check)


__all__ = ["Diagram", "FORMATS", "diagram"]
