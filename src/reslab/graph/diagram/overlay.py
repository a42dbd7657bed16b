"""A design drawn onto a view: each claim the code lacks becomes a dashed red skip at the place the design puts
it, and each residual no claim covers is highlighted (see `reslab.graph.design`).

- `around M` missing: a skip from the item that feeds M to the item that first reads what M made;
- `inside M` missing: a skip from M's first drawn item to its last, a loop on M's box when M is drawn as one box;
- `from S to M` missing: a skip from S (the item that feeds S for `S:in`, S's last item otherwise) to M's first
  item, when S names one module (no `*`); else drawn as `inside M`.

The overlay runs before blocks are folded, so blocks that differ in what the design says are drawn apart.
"""

from __future__ import annotations

from dataclasses import replace

from reslab.graph.design import Claim, DesignCheck
from reslab.graph.diagram.view import Edge, Item, View
from reslab.graph.paths import inside
from reslab.graph.trace import Trace

CLAIMED_NOTE = "red dashed: claimed by the design ({source}), missing in the code"
UNCLAIMED_NOTE = "purple: residuals that no claim of the design covers"


def overlay_design(view: View, check: DesignCheck) -> View:
    trace = check.audit.trace
    paths = {item.id: item_path(trace, item) for item in view.items}
    unclaimed = {f"n{check.audit.residuals[i].add}" for i in check.unclaimed}
    items = [replace(item, unclaimed=item.id in unclaimed) for item in view.items]
    edges = [replace(edge, unclaimed=bool(edge.skip) and edge.dst in unclaimed) for edge in view.edges]
    for result in check.missing:
        for module in result.lacking:
            edge = claimed_edge(view, paths, module, result.claim)
            if edge is not None:
                edges.append(edge)
    notes = [*view.notes, CLAIMED_NOTE.format(source=check.design.source)] if check.missing else list(view.notes)
    if check.unclaimed:
        notes.append(UNCLAIMED_NOTE)
    return View(view.title, items, edges, view.groups, notes)


def item_path(trace: Trace, item: Item) -> str | None:
    """The module an item stands for (a box) or runs in (an op, an add); None for inputs and outputs."""
    if item.kind == "module":
        return item.path
    if item.kind in ("op", "residual"):
        call = trace.nodes[int(item.id[1:])].call
        return trace.calls[call].path if call >= 0 else ""
    return None


def claimed_edge(view: View, paths: dict[str, str | None], module: str, claim: Claim) -> Edge | None:
    """The dashed skip that shows `claim` missing at `module`, or None when nothing of the module is drawn."""
    members = [item for item in view.items if paths[item.id] is not None and inside(paths[item.id], module)]
    if not members:  # drawn inside a closed box: the innermost box that holds the module
        holders = [item for item in view.items if item.kind == "module" and inside(module, item.path)]
        members = [max(holders, key=lambda item: len(item.path))] if holders else []
    if not members:
        return None
    ids = {item.id for item in members}
    first, last = members[0].id, members[-1].id  # view items are in execution order
    if claim.source is not None:
        source = _source_item(view, paths, claim.source)
        if source is not None and source not in ids:  # from where the skip would leave to where it would join
            return Edge(source, first, claim=claim.text())
    if claim.relation == "around":
        order = {item.id: item.order for item in view.items}
        feeds = [e.src for e in view.edges if e.dst in ids and e.src not in ids and not e.skip]
        reads = [e.dst for e in view.edges if e.src in ids and e.dst not in ids]
        if feeds and reads:
            return Edge(max(feeds, key=order.get), min(reads, key=order.get), claim=claim.text())
    return Edge(first, last, claim=claim.text(), span=True)  # inside M, or around M at the model's edge


def _source_item(view: View, paths: dict[str, str | None], source: str) -> str | None:
    """The item a `from` claim's skip leaves at: what feeds module S (`S:in`), or S's last drawn item."""
    module, _, where = source.partition(":")
    if "*" in module.split("."):
        return None
    members = [item.id for item in view.items if paths[item.id] is not None and inside(paths[item.id], module)]
    if not members:
        return None
    if where == "in":
        order = {item.id: item.order for item in view.items}
        feeds = [e.src for e in view.edges if e.dst == members[0] and e.src not in members and not e.skip]
        return max(feeds, key=order.get) if feeds else None
    return members[-1]
