"""Mermaid flowchart text for a `View` (renders on GitHub, in many Markdown viewers and at mermaid.live)."""

from __future__ import annotations

from reslab.graph.diagram.view import Item, View


def _label(item: Item) -> str:
    text = item.label if item.kind != "residual" else f"+ {item.detail}"
    if item.kind == "module":
        text += f"<br/><small>{item.detail}{' · dead' if item.dead else ''}</small>"
    elif item.kind in ("input", "output") and item.detail:
        text += f" · {item.detail}"
    return text.replace('"', "#quot;")


def _node(item: Item) -> str:
    label = _label(item)
    if item.kind == "residual":
        return f'{item.id}(("{label}"))'
    if item.kind in ("input", "output", "op"):
        return f'{item.id}(["{label}"])'
    return f'{item.id}["{label}"]'


def render_mermaid(view: View) -> str:
    lines = [f"%% reslab diagram: {view.title}", "flowchart TD"]
    for item in view.items:
        if item.group is None:
            lines.append(f"  {_node(item)}")
    for index, group in enumerate(view.groups):
        title = group.title + (f" × {group.repeat}" if group.repeat > 1 else "")
        lines.append(f'  subgraph g{index}["{title.replace(chr(34), "#quot;")}"]')
        lines.append("    direction TB")
        lines += [f"    {_node(item)}" for item in view.items if item.group == index]
        lines.append("  end")
    for edge in view.edges:
        if edge.claim:
            lines.append(f'  {edge.src} -.->|"claimed, missing: {edge.claim}"| {edge.dst}')
        elif edge.across:  # a connection across depth: the pairs it stands for
            pairs = ", ".join(edge.across).replace('"', "#quot;")
            lines.append(f'  {edge.src} -.->|"{edge.skip}: {pairs}{", unclaimed" if edge.unclaimed else ""}"| '
                         f"{edge.dst}")
        elif edge.skip:
            lines.append(f"  {edge.src} -.->|skip {edge.skip}{', unclaimed' if edge.unclaimed else ''}| {edge.dst}")
        elif edge.label:
            lines.append(f'  {edge.src} -->|"{edge.label}"| {edge.dst}')
        else:
            lines.append(f"  {edge.src} --> {edge.dst}")
    lines.append("  classDef module fill:#eaf1fb,stroke:#4a6fa5")
    lines.append("  classDef add fill:#fff4e5,stroke:#d9822b")
    lines.append("  classDef dead fill:#efefef,stroke:#aaa,stroke-dasharray:4 3,color:#999")
    lines.append("  classDef unclaimed fill:#fff4e5,stroke:#7b2cbf,stroke-width:2px")
    for css, chosen in (("module", [i.id for i in view.items if i.kind == "module" and not i.dead]),
                        ("add", [i.id for i in view.items if i.kind == "residual" and not i.dead]),
                        ("dead", [i.id for i in view.items if i.dead]),
                        ("unclaimed", [i.id for i in view.items if i.unclaimed])):
        if chosen:
            lines.append(f"  class {','.join(chosen)} {css}")
    for style, chosen in (("stroke:#d9822b,stroke-width:2px", [e.skip and not e.unclaimed and not e.claim
                                                               for e in view.edges]),
                          ("stroke:#7b2cbf,stroke-width:2px", [e.unclaimed for e in view.edges]),
                          ("stroke:#d62728,stroke-width:2px,stroke-dasharray:6 4", [bool(e.claim)
                                                                                   for e in view.edges])):
        indices = [str(i) for i, picked in enumerate(chosen) if picked]
        if indices:
            lines.append(f"  linkStyle {','.join(indices)} {style}")
    lines += [f"  %% {note}" for note in view.notes]
    return "\n".join(lines) + "\n"
