"""`audit(model, example_inputs)`: where a model's residual connections really are, read from one traced pass.

The audit reports each residual (`residuals.py` defines them), the *dead* modules (they run, but no model output
depends on them: the TinyTransformer article's `x = norm(x)` edit makes attention and FFN dead), the modules that
did *not run* in this pass (an unselected expert, a branch not taken: that may depend on the input), and a
summary per *block*. A block is an element of a module list (`layers.3`, `h.0`, `encoder.block.1`) that holds
parameters, at the outermost level where the elements run one after another, each reading what the one before
wrote (so the experts of a mixture are not blocks); its *sublayers* are its children that hold a weight matrix
(attention, MLP), as opposed to norms and scales.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn

from reslab.display import data_frame, html_block, html_table
from reslab.graph.paths import inside, relative
from reslab.graph.depth import find_connections
from reslab.graph.residuals import ACROSS_KINDS, KINDS, Residual
from reslab.graph.trace import Trace, trace_model


@dataclass
class BlockSummary:
    path: str
    sublayers: list[str]
    residuals: list[int]  # indices into Audit.residuals


@dataclass(repr=False)
class Audit:
    target: str
    model: str  # the model's class name
    residuals: list[Residual]
    dead: list[str]
    not_run: list[str]
    modules: dict[str, int]  # module path -> residuals inside it, for modules holding a parameterised submodule
    blocks: list[BlockSummary]
    trace: Trace = field(repr=False)
    # audit -> Diagram: set by `reslab.graph.diagram`, which draws audits and so sits above this module (no import
    # back); `reslab.graph` imports both, so every audit can draw itself
    draw: ClassVar[Callable[..., Any]]

    # --- machine-readable ----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, int]:
        with_residuals = sum(1 for b in self.blocks if b.residuals)
        return {"residual_count": len(self.residuals), "blocks_with_residuals": with_residuals,
                "blocks_without": len(self.blocks) - with_residuals}

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model,
            "residuals": [r.to_dict() for r in self.residuals],
            "dead": list(self.dead),
            "not_run": list(self.not_run),
            "modules": {path: {"residuals_inside": count} for path, count in self.modules.items()},
            "blocks": [b.path for b in self.blocks],
            "summary": self.summary(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # --- human-readable ------------------------------------------------------------------------------------------
    def lines(self) -> list[str]:
        device = "the meta device (no weights)" if self.trace.device == "meta" else self.trace.device
        out = [f"{self.target}: {self.model}, {_count(len(self.blocks), 'block')}, traced on {device}"]
        in_blocks = set()
        for block in self.blocks:
            out.append(self._block_line(block))
            in_blocks.update(block.residuals)
        outside = [i for i in range(len(self.residuals)) if i not in in_blocks]
        if outside:
            described = ", ".join(self._residual_text(self.residuals[i], None) for i in outside)
            out.append(f"outside blocks: {_count(len(outside), 'residual')} — {described}")
        kinds = Counter(r.kind for r in self.residuals)
        by_kind = ", ".join(f"{kinds[k]} {k}" for k in KINDS if kinds[k])
        out.append(f"total: {_count(len(self.residuals), 'residual')}" + (f" ({by_kind})" if by_kind else "") +
                   f" in {self.summary()['blocks_with_residuals']} of {len(self.blocks)} blocks")
        out.append("dead: " + (", ".join(self.dead) + " — they run, but no model output depends on them"
                               if self.dead else "none"))
        out.append("not run: " + (", ".join(self.not_run) + " — not called in this pass (may depend on the input)"
                                  if self.not_run else "none"))
        return out

    def format(self) -> str:
        return "\n".join(self.lines())

    __str__ = format

    def _block_line(self, block: BlockSummary) -> str:
        head, around, sublayers = self._block_parts(block)
        return head + (" — " + around if around else "") + ("; " + sublayers if sublayers else "")

    def _block_parts(self, block: BlockSummary) -> tuple[str, str, str]:
        """A block's line in three parts: "blocks.0: 2 residuals", what they are around, what its sublayers hold."""
        around = ", ".join(self._residual_text(self.residuals[i], block) for i in block.residuals)
        clauses = []
        for sub in block.sublayers:
            name = relative(sub, block.path)
            if _under(sub, self.dead):
                clauses.append(f"{name} is dead")
            elif _under(sub, self.not_run):
                clauses.append(f"{name} did not run")
            elif self.trace.modules[sub].children:  # a bare layer (a Linear) cannot hold a residual
                count = sum(1 for i in block.residuals if inside(self.residuals[i].owner, sub))
                clauses.append(f"{count or 'none'} inside {name}")
        return f"{block.path}: {_count(len(block.residuals), 'residual')}", around, ", ".join(clauses)

    def _residual_text(self, residual: Residual, block: BlockSummary | None) -> str:
        """"around attn (+norm)", the largest wrapped module first; where the add sits when that is news
        (inside a sublayer, or outside any block); the kind unless it is identity."""
        sizes = self.trace.modules
        path = block.path if block else None
        if residual.kind in ACROSS_KINDS:  # "long skip from blocks.0:out in attn_residual"
            where = f" in {relative(residual.owner, path) or '(block)'}" if residual.owner != path else ""
            return f"{residual.kind} from {residual.skip_from}" + where
        wraps = sorted(residual.wraps, key=lambda p: -sizes[p].subtree_params if p in sizes else 0)
        text = "around " + relative(wraps[0], path) if wraps else "around nothing learned"
        if len(wraps) > 1:
            text += " (" + ", ".join("+" + relative(w, path) for w in wraps[1:]) + ")"
        if block is None or _under(residual.owner, block.sublayers):
            text += f" in {relative(residual.owner, path)}"
        if residual.kind != "identity":
            text += f" [{residual.kind}]"
        return text

    # --- in a notebook -------------------------------------------------------------------------------------------
    def columns(self) -> dict[str, list[Any]]:
        """One row per block, in the words of `reslab audit`'s block lines ("blocks.0: 2 residuals — around attn
        (+norm), ...; 1 inside attn"): block, residuals (the count), around, sublayers."""
        parts = [self._block_parts(block) for block in self.blocks]
        return {"block": [b.path for b in self.blocks], "residuals": [len(b.residuals) for b in self.blocks],
                "around": [around for _, around, _ in parts], "sublayers": [subs for _, _, subs in parts]}

    def to_pandas(self):
        """The blocks table as a pandas DataFrame (`columns`)."""
        return data_frame(self.columns())

    def _repr_html_(self) -> str:
        """The blocks table, the lines `reslab audit` prints (one <li> each) and the diagram (SVG)."""
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in self.lines())
        drawn = self.diagram().svg() if hasattr(type(self), "draw") else ""
        table = html_table(self.columns(), self.lines()[0], left=("around", "sublayers"))
        return html_block(table, f"<ul style='font-family:monospace'>{lines}</ul>", drawn)

    def __repr__(self) -> str:
        summary = self.summary()
        return (f"Audit({self.target!r}: {self.model}, {summary['residual_count']} residuals in "
                f"{summary['blocks_with_residuals']} of {len(self.blocks)} blocks, {len(self.dead)} dead, "
                f"{len(self.not_run)} not run; print() for the report)")

    def diagram(self, **options):
        """The diagram of the same trace (see `reslab.graph.diagram.Diagram`)."""
        return type(self).draw(self, **options)


def audit(model: nn.Module, example_inputs: Any, target: str | None = None) -> Audit:
    """Trace `model` on `example_inputs` once and report its residual structure."""
    return audit_trace(trace_model(model, example_inputs), target or type(model).__name__)


def audit_trace(trace: Trace, target: str) -> Audit:
    paths = _block_paths(trace)
    residuals = find_connections(trace, paths)  # the blocks first: connections across depth are named by them
    dead, not_run = _unused(trace)
    blocks = [BlockSummary(path, _sublayers(trace, path), [i for i, r in enumerate(residuals)
                                                            if _home(r, paths) == path]) for path in paths]
    holders = [p for p, info in trace.modules.items() if any(trace.modules[c].subtree_params for c in info.children)]
    modules = {p: sum(1 for r in residuals if inside(r.owner, p)) for p in holders}
    return Audit(target, trace.model_cls, residuals, dead, not_run, modules, blocks, trace)


def _unused(trace: Trace) -> tuple[list[str], list[str]]:
    """(dead, not run) module paths, each reported at the outermost level where it holds for every parameterised
    module inside. A module's learned ops are the ops in its own forward that read a parameter; it is dead when it
    ran and none of them reaches an output."""
    live = trace.live()
    ran = {call.path for call in trace.calls}
    reached: dict[str, bool] = {}
    for node in trace.nodes:
        if node.uses_params and node.call >= 0:
            path = trace.calls[node.call].path
            reached[path] = reached.get(path, False) or live[node.id]
    read = {node.name.rpartition(".")[0] for node in trace.nodes if node.op == "param"}
    state: dict[str, str] = {}
    for path, info in trace.modules.items():
        if info.own_params:
            if path in reached:
                state[path] = "live" if reached[path] else "dead"
            elif path in ran or path in read:
                state[path] = "live"  # ran, or its parameters were read elsewhere: nothing to report
            else:
                state[path] = "not_run"

    subtree: dict[str, set[str]] = {}  # path -> the states of the parameterised modules in its subtree

    def states(path: str) -> set[str]:
        if path not in subtree:
            found = {state[path]} if path in state else set()
            for child in trace.modules[path].children:
                found |= states(child)
            subtree[path] = found
        return subtree[path]

    def collect(path: str, wanted: str, out: list[str]) -> None:
        if states(path) == {wanted}:
            out.append(path)
            return
        for child in trace.modules[path].children:
            collect(child, wanted, out)

    dead: list[str] = []
    not_run: list[str] = []
    collect("", "dead", dead)
    collect("", "not_run", not_run)
    return dead, not_run


def _block_paths(trace: Trace) -> list[str]:
    modules = trace.modules
    calls_of: dict[str, list[int]] = {}
    for call in trace.calls:
        calls_of.setdefault(call.path, []).append(call.id)
    paths: list[str] = []

    def visit(path: str) -> None:
        info = modules[path]
        elements = [c for c in info.children if modules[c].subtree_params and not modules[c].container]
        if elements and all(modules[c].in_sequence for c in elements) and _chained(trace, elements, calls_of):
            paths.extend(elements)
            return
        for child in info.children:
            visit(child)

    visit("")
    return _outermost(trace, paths, calls_of)


def _outermost(trace: Trace, paths: list[str], calls_of: dict[str, list[int]]) -> list[str]:
    """A list's elements that only ever run inside another block's call (the layers of a model list that a list of
    wrappers runs too) are parts of those blocks, not blocks of their own."""
    block_of = {call: path for path in paths for call in calls_of[path]}

    def nested(path: str) -> bool:
        return all(any(block_of.get(c, path) != path for c in trace.chain(call)[:-1]) for call in calls_of[path])

    return [path for path in paths if not nested(path)]


def _chained(trace: Trace, elements: list[str], calls_of: dict[str, list[int]]) -> bool:
    """Blocks run one after the other, each reading what the one before wrote; experts of a mixture, which read
    the same input or did not all run, are not blocks."""
    if any(path not in calls_of for path in elements):
        return False
    for before, after in zip(elements, elements[1:], strict=False):
        outputs = set(trace.calls[calls_of[before][-1]].outputs)
        if not outputs or not depends(trace, trace.calls[calls_of[after][0]].inputs, outputs):
            return False
    return True


def depends(trace: Trace, starts, targets: set[int]) -> bool:
    """Does any node in `starts` read (directly or not) a node in `targets`?"""
    floor = min(targets)
    stack, seen = list(starts), set()
    while stack:
        node_id = stack.pop()
        if node_id in targets:
            return True
        if node_id in seen or node_id < floor:
            continue
        seen.add(node_id)
        stack.extend(trace.nodes[node_id].inputs)
    return False


def _home(residual: Residual, blocks: list[str]) -> str | None:
    """The block a residual belongs to: the one holding its add, else the one holding what it wraps (a connection
    across depth wraps whole blocks: only its add places it)."""
    for path in [residual.owner, *(residual.wraps if residual.kind not in ACROSS_KINDS else ())]:
        for block in blocks:
            if inside(path, block):
                return block
    return None


def _sublayers(trace: Trace, block: str) -> list[str]:
    """A block's children that hold a weight matrix (looking through module lists, as in T5's `layer.0`)."""
    found = []
    for child in trace.modules[block].children:
        info = trace.modules[child]
        if info.container:
            found += [c for c in info.children if trace.modules[c].matrix]
        elif info.matrix:
            found.append(child)
    return found


def _under(path: str, roots: list[str]) -> bool:
    return any(inside(path, root) for root in roots)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
