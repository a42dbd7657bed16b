"""Graphviz DOT text for a `View`; `reslab diagram --engine dot` hands it to Graphviz's `dot` when installed."""

from __future__ import annotations

import shutil
import subprocess

from reslab.errors import ReslabError
from reslab.graph.diagram.view import Item, View


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node(item: Item) -> str:
    attrs = {"label": item.label}
    if item.kind == "residual":
        attrs.update(shape="circle", style="filled", fillcolor="#fff4e5", color="#d9822b", xlabel=item.detail,
                     width="0.3", fixedsize="true")
    elif item.kind == "op":
        attrs.update(shape="box", style="rounded", color="#888888")
    elif item.kind in ("input", "output"):
        attrs.update(label=f"{item.label} {item.detail}".strip(), shape="box", style="rounded,filled",
                     fillcolor="#f4f4f4")
    else:
        attrs.update(label=f"{item.label}\n{item.detail}", shape="box", style="rounded,filled", fillcolor="#eaf1fb",
                     color="#4a6fa5")
    if item.unclaimed:
        attrs.update(color="#7b2cbf", penwidth="2", tooltip="residual not claimed by the design")
    if item.dead:
        attrs.update(style=attrs.get("style", "") + ",dashed", fillcolor="#efefef", color="#aaaaaa",
                     fontcolor="#999999", label=attrs["label"] + " (dead)")
    return f"{_quote(item.id)} [" + ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items()) + "];"


def render_dot(view: View) -> str:
    lines = ["digraph reslab {", f"  label={_quote(view.title)}; labelloc=t; rankdir=TB;",
             '  node [fontname="monospace", fontsize=11]; edge [fontname="monospace", fontsize=9];']
    lines += [f"  {_node(item)}" for item in view.items if item.group is None]
    for index, group in enumerate(view.groups):
        title = group.title + (f" × {group.repeat}" if group.repeat > 1 else "")
        lines.append(f"  subgraph cluster_{index} {{ label={_quote(title)}; style=dashed; color=\"#b5b5b5\";")
        lines += [f"    {_node(item)}" for item in view.items if item.group == index]
        lines.append("  }")
    for edge in view.edges:
        attrs = {}
        if edge.label:
            attrs["label"] = edge.label
        if edge.claim:
            attrs.update(label=f"claimed, missing: {edge.claim}", style="dashed", color="#d62728", penwidth="1.6",
                         fontcolor="#d62728")
        elif edge.skip:
            colour = "#7b2cbf" if edge.unclaimed else "#d9822b"
            attrs.update(label=f"skip ({edge.skip})" + (", unclaimed" if edge.unclaimed else ""), color=colour,
                         penwidth="1.6", fontcolor=colour)
            if edge.across:  # a connection across depth: the pairs it stands for, and drawn as an arc
                attrs.update(label=f"{edge.skip}: {', '.join(edge.across)}", constraint="false")
        elif edge.dead:
            attrs.update(style="dashed", color="#bbbbbb")
        rendered = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
        lines.append(f"  {_quote(edge.src)} -> {_quote(edge.dst)}" + (f" [{rendered}]" if rendered else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_svg(dot_text: str) -> str:
    """Render DOT to SVG with the system's Graphviz `dot`; a one-line error when it is not installed."""
    binary = shutil.which("dot")
    if binary is None:
        raise ReslabError("--engine dot needs Graphviz's `dot` on PATH; install graphviz or drop --engine dot "
                          "(reslab draws SVG itself)")
    result = subprocess.run([binary, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ReslabError(f"Graphviz dot failed: {result.stderr.strip().splitlines()[-1] if result.stderr else ''}")
    return result.stdout
