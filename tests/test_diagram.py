"""`reslab diagram`: SVG drawn by reslab, Mermaid and DOT, all from the traced computation."""

import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import reslab
from reslab.cli import main
from reslab.graph import audit
from reslab.graph.diagram import Diagram, diagram
from reslab.graph.diagram.svg import main_path

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "graph"))
import toys  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def meta_diagram(name="gpt", depth=1, unroll=False, **config) -> Diagram:
    with torch.device("meta"):
        model = reslab.build_model(name, **config)
    return diagram(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), depth=depth, unroll=unroll,
                   target=name)


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_gpt12_folds_the_blocks_into_one_frame_with_two_skips():
    root = parse(meta_diagram(layers=12).svg())
    labels = texts(root)
    assert "blocks.0 … blocks.11 · Block" in labels and "× 12" in labels
    assert len(root.findall(f".//{SVG}circle")) == 2  # one add per sublayer, drawn once for the 12 blocks
    assert labels.count("identity") == 2
    skips = [p for p in root.iter(f"{SVG}path") if p.get("class") == "skip"]
    assert len(skips) == 2
    assert {"tok_emb", "pos_emb", "attn", "ffn", "norm", "head"} <= set(labels)


def test_unroll_draws_every_block():
    root = parse(meta_diagram(layers=3, unroll=True).svg())
    labels = texts(root)
    assert [label for label in labels if label.startswith("blocks.")] == [f"blocks.{i} · Block" for i in range(3)]
    assert len(root.findall(f".//{SVG}circle")) == 6
    assert not any(label.startswith("× ") for label in labels)


def test_main_path_is_one_straight_column_through_the_sublayers():
    view = meta_diagram(layers=2).view
    path = [view.item(i).label for i in main_path(view)]
    assert path == ["input", "tok_emb", "add", "attn_residual.norm", "attn", "+", "ffn_residual.norm", "ffn", "+",
                    "norm", "head", "logits"]  # the ModelOutput field
    svg = parse(meta_diagram(layers=2).svg())
    centres = {round(float(c.get("cx"))) for c in svg.iter(f"{SVG}circle")}
    assert len(centres) == 1  # every add sits on the main column


def test_no_residual_means_no_add_node_and_no_skip_edge():
    view = meta_diagram(layers=4, residual="none").view
    assert not [i for i in view.items if i.kind == "residual"]
    assert not [e for e in view.edges if e.skip]
    assert [g.repeat for g in view.groups] == [4]


def test_kinds_label_the_add_nodes():
    view = meta_diagram(layers=2, residual="post").view
    assert [i.detail for i in view.items if i.kind == "residual"] == ["normalized", "normalized"]
    assert sorted(e.skip for e in view.edges if e.skip) == ["normalized", "normalized"]


def test_dead_modules_are_drawn_grey(tmp_path):
    d = meta_diagram("tiny", residual="article-edit")
    dead = [i for i in d.view.items if i.dead]
    assert [(i.label, i.kind) for i in dead] == [("attn", "module"), ("ffn", "module")]
    root = parse(d.svg())
    dead_boxes = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "box dead"]
    assert len(dead_boxes) == 2
    assert "CausalSelfAttention · dead" in texts(root)
    mermaid = d.mermaid()
    dead_ids = {i.id for i in dead}
    assert re.search(r"class (\S+) dead", mermaid).group(1).split(",") == [i.id for i in dead]
    assert all(f'"{i}" [' in d.dot() and "(dead)" in d.dot() for i in dead_ids)


def test_depth_opens_nested_modules():
    shallow = {i.label for i in meta_diagram(layers=1).view.items}
    deep = {i.label for i in meta_diagram(layers=1, depth=4).view.items}
    assert "attn" in shallow and "qkv" not in shallow
    assert {"attn.qkv", "attn.out", "scaled_dot_product_attention"} <= deep


def test_shapes_on_edges():
    view = meta_diagram(layers=1, width=32, heads=2).view
    assert {e.label for e in view.edges} >= {"1×8", "1×8×32"}


def test_mermaid_and_dot_text():
    d = meta_diagram(layers=2)
    mermaid = d.mermaid()
    assert mermaid.startswith("%% reslab diagram: gpt\nflowchart TD\n")
    assert 'subgraph g0["blocks.0 … blocks.1 · Block × 2"]' in mermaid
    assert mermaid.count("-.->|skip identity|") == 2
    dot = d.dot()
    assert dot.startswith("digraph reslab {") and "subgraph cluster_0" in dot
    assert dot.count('label="skip (identity)"') == 2


def test_hf_bert_diagram():
    pytest.importorskip("transformers")
    from reslab.graph.targets import load_target

    target = load_target("hf:bert")
    view = diagram(target.model, target.inputs).view
    assert [i.detail for i in view.items if i.kind == "residual"] == ["normalized", "normalized"]
    assert {i.label for i in view.items if i.kind == "output"} == {"logits"}  # hf: builds BertForMaskedLM


def test_multi_stream_diagram():
    view = diagram(toys.MultiStream(), (toys.features(),)).view
    assert [i.detail for i in view.items if i.kind == "residual"] == ["multi-stream"]


def test_cli_writes_each_format(tmp_path, capsys):
    for suffix, start in ((".svg", "<svg"), (".mmd", "%% reslab"), (".dot", "digraph")):
        out = tmp_path / f"gpt{suffix}"
        assert main(["diagram", "gpt", "--layers", "2", "-o", str(out)]) == 0
        assert out.read_text().startswith(start)
    assert "wrote" in capsys.readouterr().out
    ET.parse(tmp_path / "gpt.svg")


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert main(["diagram", "gpt", "-o", str(tmp_path / "gpt.png")]) == 2
    assert "name the file .svg, .mmd or .dot" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["diagram", "gpt", "--engine", "dot", "-o", str(tmp_path / "gpt.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Graphviz's `dot`" in err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graphviz_engine(tmp_path):
    out = tmp_path / "gpt.svg"
    assert main(["diagram", "gpt", "--layers", "2", "--engine", "dot", "-o", str(out)]) == 0
    ET.parse(out)


def test_jupyter_reprs():
    with torch.device("meta"):
        model = reslab.build_model("gpt", layers=2)
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), "gpt")
    assert result._repr_html_().count("<li>") == len(result.lines())
    svg = result.diagram()._repr_svg_()
    assert svg.startswith("<svg") and parse(svg) is not None
