"""A self-contained SVG renderer for a `View`: no Graphviz, no JavaScript.

Layout, chosen so that the residual structure is what the eye sees first:

- one item per row, in execution order (so every edge points down);
- the *main path* (the longest path from an input to an output) is one straight column;
- edges between main-path items that are not next to each other (the skips of residual connections above all)
  run in lanes to the right of that column and enter the add node from the side;
- everything off the main path (position embeddings, dead sublayers, a second input) sits in a column on the
  left, joined to the main column through lanes between the two;
- each block is framed; a folded run of equal blocks has one frame marked "x N";
- dead modules (they run, but no output depends on them) are grey and dashed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape

from reslab.graph.diagram.view import Edge, Item, View

CHAR = 7.2  # width of one character of the 12px monospace font
SMALL = 6.0  # width of one character of the 10px font
ROW_GAP = 22
LANE = 14
MARGIN = 20
RADIUS = 12
SPLIT = 5  # vertical offset between an edge leaving a node's side and one arriving there
FRAME_TITLE = 26
LEGEND = "orange: skip edges of residual connections · grey dashed: dead (runs, but no output depends on it)"
CLAIMED = "#d62728"  # a design's claim the code lacks
UNCLAIMED = "#7b2cbf"  # a residual no claim of the design covers
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"


@dataclass
class Box:
    item: Item
    main: bool
    width: float
    height: float
    x: float = 0.0  # centre
    y: float = 0.0  # centre

    @property
    def left(self) -> float:
        return self.x - self.width / 2

    @property
    def right(self) -> float:
        return self.x + self.width / 2

    @property
    def top(self) -> float:
        return self.y - self.height / 2

    @property
    def bottom(self) -> float:
        return self.y + self.height / 2


def _size(item: Item) -> tuple[float, float]:
    if item.kind == "residual":
        return 2 * RADIUS, 2 * RADIUS
    if item.kind == "op":
        return len(item.label) * CHAR + 18, 24
    if item.kind in ("input", "output"):
        return (len(item.label) + len(item.detail) + 3) * CHAR + 24, 28
    detail = item.detail + (" · dead" if item.dead else "")
    return max(len(item.label) * CHAR, len(detail) * SMALL * 1.1) + 28, 40


def main_path(view: View) -> list[str]:
    """The longest path (in items) that ends at an output, or anywhere when nothing reaches an output."""
    order = {item.id: i for i, item in enumerate(view.items)}
    preds: dict[str, list[str]] = {item.id: [] for item in view.items}
    for edge in view.edges:
        if order[edge.src] < order[edge.dst]:
            preds[edge.dst].append(edge.src)
    best: dict[str, tuple[int, str | None]] = {}
    for item in view.items:
        choices = [(best[p][0] + 1, -order[p], p) for p in preds[item.id]]
        best[item.id] = (max(choices)[0], max(choices)[2]) if choices else (1, None)
    ends = [item.id for item in view.items if item.kind == "output"] or [item.id for item in view.items]
    if not ends:
        return []
    current: str | None = max(ends, key=lambda i: (best[i][0], -order[i]))
    path = []
    while current is not None:
        path.append(current)
        current = best[current][1]
    return path[::-1]


class _Lanes:
    """Vertical lanes for edges, given out first-fit so that no two edges share a lane over overlapping rows."""

    def __init__(self):
        self.ends: list[float] = []

    def take(self, start: float, end: float) -> int:
        for index, last in enumerate(self.ends):
            if last < start:
                self.ends[index] = end
                return index
        self.ends.append(end)
        return len(self.ends) - 1


STYLE = (
    "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
    "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker>"
    "<marker id='arrow-skip' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
    "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#d9822b'/></marker>"
    "<marker id='arrow-claimed' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
    "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#d62728'/></marker>"
    "<marker id='arrow-unclaimed' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
    "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#7b2cbf'/></marker></defs>\n"
    "<style>.box{fill:#eaf1fb;stroke:#4a6fa5;stroke-width:1.2}.io{fill:#f4f4f4;stroke:#777}"
    ".op{fill:#fff;stroke:#888}.add{fill:#fff4e5;stroke:#d9822b;stroke-width:1.6}"
    ".dead{fill:#efefef;stroke:#aaa;stroke-dasharray:4 3}.deadtext{fill:#999}"
    ".frame{fill:#fafafa;stroke:#b5b5b5;stroke-dasharray:6 3}.edge{fill:none;stroke:#555;stroke-width:1.2}"
    ".skip{fill:none;stroke:#d9822b;stroke-width:1.6}.deadedge{fill:none;stroke:#bbb;stroke-dasharray:4 3}"
    ".shape{fill:#777;font-size:10px}.cls{fill:#555;font-size:10px}.kind{fill:#b0601a;font-size:10px}"
    ".title{font-weight:bold;stroke:#fafafa;stroke-width:5px;paint-order:stroke}"
    ".claimed{fill:none;stroke:#d62728;stroke-width:1.6;stroke-dasharray:6 4}.unclaimed{stroke:#7b2cbf}</style>"
)


@dataclass
class Route:
    edge: Edge
    how: str  # "down" (main column), "side-down" (side column), "right" or "middle" (in a lane)
    lane: int = 0


@dataclass
class Layout:
    boxes: dict[str, Box]
    routes: list[Route]
    main_x: float
    right_x0: float  # first lane right of the main column
    middle_x0: float  # first lane between the side and main columns
    height: float


def layout(view: View, subtitle: str) -> Layout:
    on_main = set(main_path(view))
    boxes = {item.id: Box(item, item.id in on_main, *_size(item)) for item in view.items}
    height = _place_rows(view, boxes, top=MARGIN + (44 if subtitle else 30))
    routes, right_lanes, middle_lanes = _route(view, boxes)

    main_width = max([b.width for b in boxes.values() if b.main] + [120.0])
    kinds = [len(item.detail) for item in view.items if item.kind == "residual"]
    if kinds:  # room for the kind label beside each add node
        main_width = max(main_width, 2 * (RADIUS + 10 + max(kinds) * SMALL))
    side_width = max([b.width for b in boxes.values() if not b.main] + [0.0])
    side_x = MARGIN + 12 + side_width / 2
    main_left = MARGIN + 12 + (side_width + 18 + middle_lanes * LANE + 12 if side_width else 0)
    titles_width = max([(len(g.title) + 1) * CHAR for g in view.groups] + [0])
    main_left = max(main_left, MARGIN + 16 + titles_width - main_width / 2)  # frame titles end left of the column
    main_x = main_left + main_width / 2
    for box in boxes.values():
        box.x = main_x if box.main else side_x
    return Layout(boxes, routes, main_x, main_x + main_width / 2 + 18, side_x + side_width / 2 + 18, height)


def _place_rows(view: View, boxes: dict[str, Box], top: float) -> float:
    """One row per item, top to bottom, with room for frame titles; returns the height used."""
    firsts = {members[0].id for members in _members(view).values()}
    lasts = {members[-1].id for members in _members(view).values()}
    y = top
    for item in view.items:
        box = boxes[item.id]
        if item.id in firsts:
            y += FRAME_TITLE
        box.y = y + box.height / 2
        y += box.height + ROW_GAP + (8 if item.id in lasts else 0)
    return y + 30


def _route(view: View, boxes: dict[str, Box]) -> tuple[list[Route], int, int]:
    """Straight where an edge joins neighbours in a column, else a lane; returns (routes, right lanes, middle)."""
    main_seq = [item.id for item in view.items if boxes[item.id].main]
    side_seq = [item.id for item in view.items if not boxes[item.id].main]
    next_main = dict(zip(main_seq, main_seq[1:], strict=False))
    next_side = dict(zip(side_seq, side_seq[1:], strict=False))
    right, middle = _Lanes(), _Lanes()
    routes = []
    for edge in sorted(view.edges, key=lambda e: (boxes[e.src].y, boxes[e.dst].y)):
        src, dst = boxes[edge.src], boxes[edge.dst]
        if edge.claim and src.main and dst.main:  # a claimed skip always takes a lane, even between neighbours
            start, end = (src.top, dst.bottom) if edge.span else (src.y + SPLIT, dst.y - SPLIT)
            routes.append(Route(edge, "right", right.take(start, end)))
        elif src.main and dst.main:
            if next_main.get(edge.src) == edge.dst:
                routes.append(Route(edge, "down"))
            else:  # leave below the centre and arrive above it, so consecutive skips can share a lane
                routes.append(Route(edge, "right", right.take(src.y + SPLIT, dst.y - SPLIT)))
        elif not src.main and not dst.main and next_side.get(edge.src) == edge.dst:
            routes.append(Route(edge, "side-down"))
        else:
            routes.append(Route(edge, "middle", middle.take(min(src.y, dst.y), max(src.y, dst.y))))
    return routes, len(right.ends), len(middle.ends)


def _members(view: View) -> dict[int, list[Item]]:
    members: dict[int, list[Item]] = {}
    for item in view.items:
        if item.group is not None:
            members.setdefault(item.group, []).append(item)
    return members


def render_svg(view: View, subtitle: str = "") -> str:
    plan = layout(view, subtitle)
    boxes = plan.boxes
    frames, titles, frame_right = [], [], []
    for index, members in _members(view).items():  # frames first, so edges and boxes draw over them
        group, placed = view.groups[index], [boxes[item.id] for item in members]
        top, bottom = placed[0].top - FRAME_TITLE + 4, placed[-1].bottom + 10
        inner = [r.lane for r in plan.routes if r.how == "right" and boxes[r.edge.src].item.group == index
                 and boxes[r.edge.dst].item.group == index]
        left = min(min(b.left for b in placed) - 12, plan.main_x - 16 - (len(group.title) + 1) * CHAR)
        badge = f"× {group.repeat}" if group.repeat > 1 else ""
        right = max(max(b.right for b in placed) + 12, plan.right_x0 + (max(inner) + 1) * LANE if inner else 0,
                    left + (len(group.title) + len(badge) + 4) * CHAR + 16)
        frame_right.append(right)
        frames.append(f'<rect class="frame" x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
                      f'height="{bottom - top:.1f}" rx="8"/>')
        # titles go over the edges, on a halo, so a line through a frame title does not cross its letters
        titles.append(f'<text class="title" x="{left + 8:.1f}" y="{top + 15:.1f}">{escape(group.title)}</text>')
        if badge:
            titles.append(f'<text class="title" x="{right - 8:.1f}" y="{top + 15:.1f}" text-anchor="end" '
                          f'fill="#4a6fa5">{badge}</text>')
    lanes = max([r.lane + 1 for r in plan.routes if r.how == "right"] + [0])
    width = max([plan.right_x0 + lanes * LANE + MARGIN + 12, MARGIN * 2 + (len(view.title) + 2) * CHAR * 1.15,
                 MARGIN * 2 + max(len(subtitle), *map(len, [LEGEND, *view.notes])) * SMALL * 1.1] +
                [r + MARGIN for r in frame_right])
    legend = [LEGEND, *view.notes]
    height = plan.height + 14 * len(view.notes)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}" font-size="12">',
        STYLE,
        '<rect width="100%" height="100%" fill="#fff"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 12}" font-size="14" font-weight="bold">{escape(view.title)}</text>',
    ]
    if subtitle:
        out.append(f'<text x="{MARGIN}" y="{MARGIN + 30}" class="cls">{escape(subtitle)}</text>')
    out += frames
    out += [_edge(route, plan) for route in plan.routes]
    out += titles
    out += [_node(box) for box in boxes.values()]
    out += [f'<text x="{MARGIN}" y="{height - 12 - 14 * (len(legend) - 1 - i):.0f}" class="cls">{escape(line)}</text>'
            for i, line in enumerate(legend)]
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _edge(route: Route, plan: Layout) -> str:
    edge = route.edge
    points, label = _points(route, plan)
    d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points)
    if edge.claim:  # presentation attributes as well as the class, so any SVG reader shows it dashed red
        return (f'<path class="claimed" d="{d}" fill="none" stroke="{CLAIMED}" stroke-width="1.6" '
                f'stroke-dasharray="6 4" marker-end="url(#arrow-claimed)"><title>claimed by the design, missing '
                f'in the code: {escape(edge.claim)}</title></path>')
    css = "skip" if edge.skip else "deadedge" if edge.dead else "edge"
    if edge.unclaimed:
        css += " unclaimed"
    marker = ("arrow-unclaimed" if edge.unclaimed else "arrow-skip") if edge.skip else "arrow"
    note = ", not claimed by the design" if edge.unclaimed else ""
    title = f"<title>skip ({escape(edge.skip)}){note}</title>" if edge.skip else ""
    if edge.across and route.how == "right":
        return _arc(route, plan, css, marker, note)
    if edge.across:  # from the side column: drawn as the other edges there, the connections named in its title
        title = f"<title>{escape(edge.skip)}: {escape(', '.join(edge.across))}{note}</title>"
    return f'<path class="{css}" d="{d}" marker-end="url(#{marker})">{title}</path>{label}'


def _arc(route: Route, plan: Layout, css: str, marker: str, note: str) -> str:
    """A connection across depth: an arc out to its lane and back, from the source (a block's output, the
    embedding) to the add it joins, however many folded blocks lie between, labelled along the lane with the
    connections it stands for ("blocks.2:out → blocks.5"; a folded arc lists every pair)."""
    edge = route.edge
    points, _ = _points(route, plan)
    (x1, y1), (x2, y2) = points[0], points[-1]
    lane = max(x for x, _ in points)
    bulge = max(x1, x2) + (lane - max(x1, x2)) * 4 / 3  # a cubic's control points at 4/3 reach the lane itself
    d = f"M{x1:.1f},{y1:.1f} C{bulge:.1f},{y1:.1f} {bulge:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    pairs = ", ".join(edge.across)
    title = f"<title>{escape(edge.skip)}: {escape(pairs)}{note}</title>"
    text = f"{edge.skip}: {_short(edge.across)}"
    room = max(abs(y2 - y1) - 16, 0) / SMALL
    if len(text) > room:
        text = text[:max(int(room) - 1, 0)] + "…" if room >= 4 else ""
    mid = (y1 + y2) / 2
    label = (f'<text class="kind" x="{lane + 4:.1f}" y="{mid:.1f}" text-anchor="middle" '
             f'transform="rotate(90 {lane + 4:.1f} {mid:.1f})">{escape(text)}</text>') if text else ""
    return f'<path class="{css} across" d="{d}" marker-end="url(#{marker})">{title}</path>{label}'


def _short(pairs: tuple[str, ...]) -> str:
    """Pairs with the list they share named once: "blocks 2:out → 5, 1:out → 6" for blocks.2:out → blocks.5, ..."""
    ends = [end for pair in pairs for end in pair.split(" → ")]
    lists = {end.partition(":")[0].rpartition(".")[0] for end in ends}
    if len(lists) != 1 or not next(iter(lists)):
        return ", ".join(pairs)
    prefix = next(iter(lists)) + "."
    return prefix[:-1] + " " + ", ".join(pair.replace(prefix, "") for pair in pairs)


def _points(route: Route, plan: Layout) -> tuple[list[tuple[float, float]], str]:
    """The polyline of an edge, and its shape label (drawn beside straight edges only)."""
    edge, how = route.edge, route.how
    src, dst = plan.boxes[edge.src], plan.boxes[edge.dst]
    leave, arrive = (src.top + SPLIT, dst.bottom - SPLIT) if edge.span else (src.y, dst.y)
    if how == "down":
        label = (f'<text class="shape" x="{src.x + 6:.1f}" y="{src.bottom + 12:.1f}">{escape(edge.label)}</text>'
                 if edge.label else "")
        return [(src.x, src.bottom), (dst.x, dst.top)], label
    if how == "side-down":
        return [(src.x, src.bottom), (dst.x, dst.top)], ""
    if how == "right":
        x = plan.right_x0 + route.lane * LANE
        if not edge.span:
            leave, arrive = src.y + SPLIT, dst.y - SPLIT
        return [(src.right, leave), (x, leave), (x, arrive), (dst.right, arrive)], ""
    x = plan.middle_x0 + route.lane * LANE
    start = (src.right, leave) if not src.main else (src.left, leave)
    end = (dst.left, arrive) if dst.main else (dst.right, arrive)
    return [start, (x, leave), (x, arrive), end], ""


def _node(box: Box) -> str:
    item = box.item
    dead = " dead" if item.dead else ""
    text_class = ' class="deadtext"' if item.dead else ""
    if item.kind == "residual":
        css, stroke, note = "add" + dead, "", ""
        if item.unclaimed:
            css, stroke, note = css + " unclaimed", f' stroke="{UNCLAIMED}"', ", not claimed by the design"
        return (f'<g><title>residual connection ({escape(item.detail)}){note}</title>'
                f'<circle class="{css}"{stroke} cx="{box.x:.1f}" cy="{box.y:.1f}" r="{RADIUS}"/>'
                f'<text x="{box.x:.1f}" y="{box.y + 5:.1f}" text-anchor="middle" font-size="16" '
                f'font-weight="bold" fill="#b0601a">+</text>'
                f'<text class="kind" x="{box.x - RADIUS - 3:.1f}" y="{box.y + RADIUS + 6:.1f}" text-anchor="end">'
                f'{escape(item.detail)}</text></g>')
    if item.kind == "op":
        return (f'<g><rect class="op{dead}" x="{box.left:.1f}" y="{box.top:.1f}" width="{box.width:.1f}" '
                f'height="{box.height:.1f}" rx="12"/><text x="{box.x:.1f}" y="{box.y + 4:.1f}" '
                f'text-anchor="middle"{text_class}>{escape(item.label)}</text></g>')
    if item.kind in ("input", "output"):
        return (f'<g><rect class="io" x="{box.left:.1f}" y="{box.top:.1f}" width="{box.width:.1f}" '
                f'height="{box.height:.1f}" rx="14"/><text x="{box.x:.1f}" y="{box.y + 4:.1f}" '
                f'text-anchor="middle">{escape(item.label)} <tspan class="shape">{escape(item.detail)}</tspan>'
                f'</text></g>')
    detail = item.detail + (" · dead" if item.dead else "")
    return (f'<g><title>{escape(item.path or "(model)")}</title><rect class="box{dead}" x="{box.left:.1f}" '
            f'y="{box.top:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="5"/>'
            f'<text x="{box.x:.1f}" y="{box.y - 2:.1f}" text-anchor="middle" font-weight="bold"{text_class}>'
            f'{escape(item.label)}</text><text class="cls" x="{box.x:.1f}" y="{box.y + 12:.1f}" '
            f'text-anchor="middle">{escape(detail)}</text></g>')


def side_by_side(parts: list[str], gap: float = 24.0) -> str:
    """One SVG holding the SVGs `render_svg` wrote, left to right, each as a nested <svg> at its own offset."""
    placed, x, height = [], 0.0, 0.0
    for text in parts:
        match = re.search(r'<svg xmlns="http://www.w3.org/2000/svg" width="([\d.]+)" height="([\d.]+)"', text)
        if match is None:
            raise ValueError("side_by_side takes SVGs written by render_svg")
        width, tall = float(match.group(1)), float(match.group(2))
        placed.append(text.replace('<svg xmlns="http://www.w3.org/2000/svg" ', f'<svg x="{x:.0f}" y="0" ', 1))
        x, height = x + width + gap, max(height, tall)
    width = max(x - gap, 0.0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="#fff"/>\n'
            + "".join(placed) + "</svg>\n")
