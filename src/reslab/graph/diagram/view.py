"""From a trace to what a diagram shows: boxes, op and add nodes, edges, and block frames (folded when equal).

The view is drawn from the same trace the audit reads, so it cannot show a skip the code does not have. Each
recorded op is assigned to one *item*:

- a module call that is *closed* (drawn as one box) absorbs every op that ran inside it;
- in *open* calls (the model itself, calls nested less than `depth` deep, blocks, calls that perform a residual add,
  calls that run modules they do not own, like a residual site running its sublayer) each op is its own item:
  a residual add becomes an explicit add node labelled with its kind, another op on data becomes a small op node,
  views, casts and scalings merge into the item they read, and ops on constants are not drawn;
- closed calls that only reshape or drop out (Dropout, Identity) merge into their input too.

Blocks (see `audit.py`) get a frame; a run of consecutive blocks whose contents are equal is folded into one frame
marked "x N" unless `unroll` is asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from reslab.graph.audit import Audit
from reslab.graph.paths import inside, relative
from reslab.graph.residuals import ACROSS_KINDS
from reslab.graph.trace import Trace


@dataclass
class Item:
    id: str
    kind: str  # "input", "output", "module", "op", "residual"
    label: str
    detail: str  # class name, shape, or residual kind
    order: int  # position in execution order
    dead: bool = False
    group: int | None = None  # index into View.groups
    path: str = ""  # module path, for modules
    unclaimed: bool = False  # a residual add no claim of the design covers


@dataclass
class Edge:
    src: str
    dst: str
    label: str = ""  # tensor shape, when known
    skip: str = ""  # the residual kind, for the skip edge of a residual
    dead: bool = False
    claim: str = ""  # a design claim the code lacks ("inside layers.*.mlp"), drawn where the design puts it
    unclaimed: bool = False  # the skip edge of a residual no claim of the design covers
    span: bool = False  # a claim edge from the top of `src` to the bottom of `dst` (a loop on one box)
    across: tuple[str, ...] = ()  # a connection across depth: "blocks.2:out → blocks.5", one per connection drawn


@dataclass
class Group:
    title: str  # "blocks.0 … blocks.11 · Block"
    repeat: int
    paths: list[str] = field(default_factory=list)


@dataclass
class View:
    title: str
    items: list[Item]
    edges: list[Edge]
    groups: list[Group]
    notes: list[str] = field(default_factory=list)  # legend lines beyond the standard one (a design's)

    def item(self, item_id: str) -> Item:
        return self._index()[item_id]

    def _index(self) -> dict[str, Item]:
        return {item.id: item for item in self.items}


def shape_text(shape: tuple[int, ...] | None) -> str:
    return "×".join(str(s) for s in shape) if shape else ""


def build_view(audit: Audit, depth: int = 1, unroll: bool = False) -> View:
    view = _Builder(audit, audit.trace, depth).build()
    return view if unroll else fold(view)


class _Builder:
    def __init__(self, audit: Audit, trace: Trace, depth: int):
        self.audit, self.trace, self.depth = audit, trace, depth
        self.adds = {r.add: r for r in audit.residuals}
        self.live = trace.live()
        self.items: dict[str, Item] = {}
        self.unit: list[str | None] = [None] * len(trace.nodes)
        block_paths = {b.path for b in audit.blocks}
        self.block_calls: dict[str, int] = {}  # block path -> its first call
        for call in trace.calls:
            if call.path in block_paths:
                self.block_calls.setdefault(call.path, call.id)
        self.open = self._open_calls()

    def _open_calls(self) -> set[int]:
        trace = self.trace
        open_calls = {0} if trace.calls else set()
        for residual in self.audit.residuals:
            open_calls.update(trace.chain(trace.nodes[residual.add].call))
        for call in trace.calls:
            if call.depth < self.depth or call.id in self.block_calls.values():
                open_calls.add(call.id)
            parent = trace.calls[call.parent] if call.parent >= 0 else None
            if parent is not None and parent.path and not inside(call.path, parent.path):
                open_calls.add(parent.id)  # a call that runs a module it does not own: show what it runs
        return open_calls

    def _closed(self, call_id: int) -> int | None:
        """The outermost closed call around `call_id`, or None when the op runs in an open body."""
        if call_id < 0:
            return None
        for c in self.trace.chain(call_id):
            if c not in self.open:
                return c
        return None

    def build(self) -> View:
        nodes = self.trace.nodes
        closed_of = {node.id: self._closed(node.call) for node in nodes if node.role != "leaf"}
        members: dict[int, list[int]] = {}
        for node_id, closed in closed_of.items():
            if closed is not None:
                members.setdefault(closed, []).append(node_id)
        drawn = {call_id: self._box_mode(call_id, ids) for call_id, ids in members.items()}
        for node in nodes:
            if node.role == "leaf":
                if node.op == "input":
                    self.unit[node.id] = self._add(f"in{node.id}", "input", node.name, shape_text(node.shape),
                                                   -1_000_000 + node.id)
                continue
            closed = closed_of[node.id]
            if closed is not None:
                mode = drawn[closed]
                if mode == "box":
                    self.unit[node.id] = f"c{closed}"
                elif mode == "pass" and node.through >= 0:
                    self.unit[node.id] = self.unit[node.through]
            elif node.id in self.adds:
                residual = self.adds[node.id]
                self.unit[node.id] = self._add(f"n{node.id}", "residual", "+", residual.kind, node.id,
                                               dead=not self.live[node.id])
            elif node.role in ("view", "scale") or not node.data:
                if node.through >= 0 and node.data:
                    self.unit[node.id] = self.unit[node.through]
            else:
                self.unit[node.id] = self._add(f"n{node.id}", "op", node.op, "", node.id,
                                               dead=not self.live[node.id])
        for call_id, mode in drawn.items():
            if mode == "box":
                call = self.trace.calls[call_id]
                dead = any(inside(call.path, d) for d in self.audit.dead)
                self._add(f"c{call_id}", "module", call.path or "(model)", call.cls, members[call_id][0], dead,
                          call.path)
        edges = self._edges()
        groups = self._groups()
        items = sorted(self.items.values(), key=lambda item: item.order)
        return View(self.audit.target, items, edges, groups)

    def _add(self, item_id: str, kind: str, label: str, detail: str, order: int, dead: bool = False,
             path: str = "") -> str:
        self.items[item_id] = Item(item_id, kind, label, detail, order, dead, path=path)
        return item_id

    def _box_mode(self, call_id: int, members: list[int]) -> str:
        """"box" to draw the call; "hidden" when it works on constants only (rotary tables, masks); "pass" when it
        only lets the value through (Dropout, Identity), so its input's item stands for its output."""
        nodes = self.trace.nodes
        info = self.trace.modules.get(self.trace.calls[call_id].path)
        learned = bool(info and info.subtree_params)
        data_ops = [i for i in members if nodes[i].data]
        if not data_ops and not learned:
            return "hidden"
        if not learned and all(nodes[i].role == "view" for i in data_ops):
            return "pass"
        return "box"

    def _edges(self) -> list[Edge]:
        nodes = self.trace.nodes
        skips = {(self.unit[r.skip], self.unit[r.add]): r.kind for r in self.audit.residuals}
        across: dict[tuple[str | None, str | None], list[str]] = {}
        for r in self.audit.residuals:
            if r.kind in ACROSS_KINDS:
                across.setdefault((self.unit[r.skip], self.unit[r.add]), []).append(f"{r.skip_from} → "
                                                                                   f"{self._destination(r.owner)}")
        edges: dict[tuple[str, str], Edge] = {}
        for node in nodes:
            dst = self.unit[node.id]
            if dst is None or dst not in self.items:
                continue
            for source in node.inputs:
                src = self.unit[source]
                if src is None or src == dst or src not in self.items:
                    continue
                if (src, dst) not in edges:
                    edges[(src, dst)] = Edge(src, dst, shape_text(nodes[source].shape), skips.get((src, dst), ""),
                                             self.items[src].dead, across=tuple(across.get((src, dst), ())))
        for index, (name, node_id) in enumerate(self.trace.outputs):
            src = self.unit[node_id]
            if src is None or src not in self.items:
                continue
            out = self._add(f"out{index}", "output", name, shape_text(nodes[node_id].shape), 1_000_000 + index)
            edges[(src, out)] = Edge(src, out, "", "", self.items[src].dead)
        used = {e.src for e in edges.values()} | {e.dst for e in edges.values()}
        for item_id in [i for i, item in self.items.items() if item.kind == "input" and i not in used]:
            del self.items[item_id]
        return list(edges.values())

    def _destination(self, owner: str) -> str:
        """Where a connection across depth arrives: the block holding its add, else the module that adds it."""
        return next((b.path for b in self.audit.blocks if inside(owner, b.path)), owner or "(model)")

    def _groups(self) -> list[Group]:
        trace = self.trace
        groups: list[Group] = []
        for block in self.audit.blocks:
            call_id = self.block_calls.get(block.path)
            if call_id is None:
                continue
            call = trace.calls[call_id]
            index = len(groups)
            groups.append(Group(f"{block.path} · {call.cls}", 1, [block.path]))
            for item in self.items.values():
                node_call = self._item_call(item)
                if node_call is not None and trace.within(node_call, call_id):
                    item.group = index
                    if item.kind == "module":
                        item.label = relative(item.path, block.path)
        return groups

    def _item_call(self, item: Item) -> int | None:
        if item.kind == "module":
            return int(item.id[1:])
        if item.kind in ("op", "residual"):
            return self.trace.nodes[int(item.id[1:])].call
        return None


def fold(view: View) -> View:
    """Fold each run of consecutive, equal block frames into its first one, marked "x N"."""
    members: dict[int, list[Item]] = {}
    for item in view.items:
        if item.group is not None:
            members.setdefault(item.group, []).append(item)
    signature = {g: _signature(view, members.get(g, [])) for g in range(len(view.groups))}
    alias: dict[str, str] = {}
    keep_groups: list[Group] = []
    renumber: dict[int, int] = {}
    g = 0
    while g < len(view.groups):
        run = g + 1
        while run < len(view.groups) and members.get(run) and signature[run] == signature[g] and \
                _same_list(view.groups[g].paths[0], view.groups[run].paths[0]):
            run += 1
        group = view.groups[g]
        renumber[g] = len(keep_groups)
        if run - g > 1:
            last = view.groups[run - 1].paths[0]
            group = Group(f"{group.paths[0]} … {last} · {group.title.split(' · ')[-1]}", run - g,
                          [view.groups[k].paths[0] for k in range(g, run)])
            for k in range(g + 1, run):
                for mine, first in zip(members[k], members[g], strict=True):
                    alias[mine.id] = first.id
        keep_groups.append(group)
        g = run
    items = [replace(item, group=None if item.group is None else renumber[item.group])
             for item in view.items if item.id not in alias]
    order = {item.id: item.order for item in items}
    group_of = {item.id: item.group for item in items}
    edges: dict[tuple[str, str], Edge] = {}
    for edge in view.edges:
        src, dst = alias.get(edge.src, edge.src), alias.get(edge.dst, edge.dst)
        if src not in order or dst not in order or (src == dst and not edge.claim):
            continue
        if order[src] >= order[dst] and group_of[src] is not None and group_of[src] == group_of[dst] and \
                not edge.claim and not edge.across:
            continue  # block k's output into block k+1: inside a folded frame this is the repetition itself
        key = (src, dst, edge.claim)
        if key not in edges:
            edges[key] = replace(edge, src=src, dst=dst)
        else:
            if edge.skip:
                edges[key].skip = edge.skip
            # connections across depth folded onto one arc keep every pair they stand for
            edges[key].across = tuple(dict.fromkeys(edges[key].across + edge.across))
    return View(view.title, items, list(edges.values()), keep_groups, view.notes)


def _signature(view: View, items: list[Item]) -> tuple:
    index = {item.id: i for i, item in enumerate(items)}
    internal = sorted((index[e.src], index[e.dst], e.skip, e.claim) for e in view.edges
                      if e.src in index and e.dst in index)
    return tuple((i.kind, i.label, i.detail, i.dead, i.unclaimed) for i in items), tuple(internal)


def _same_list(a: str, b: str) -> bool:
    return a.rpartition(".")[0] == b.rpartition(".")[0]
