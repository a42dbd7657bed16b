"""Connections across depth in `reslab audit`, `--design` and `reslab diagram`: each connection reported with its
source and destination and a kind that says what it is, none missed, none made up, nothing dead (issue 26)."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import reslab
from reslab.graph import KINDS, audit
from reslab.graph.residuals import ACROSS_KINDS
from test_audit_models import audited_connections, depth_connections, meta_audit, meta_build

SVG = "{http://www.w3.org/2000/svg}"

# (scheme, layers, options): every connection at a depth where it connects something, its options varied.
CONFIGS = [
    ("x0", 4, {}), ("pre+x0", 3, {"x0_gated": True}),
    ("pre+unet", 6, {}), ("pre+unet", 7, {"unet_plain": True}),
    ("long-skip", 4, {}), ("long-skip", 6, {"long_skip_from": 0, "long_skip_to": 4}),
    ("backout", 4, {}), ("backout", 5, {"backout_from": 0}),
    ("denseformer", 4, {}), ("denseformer", 6, {"denseformer_dilation": 2, "denseformer_period": 2}),
    ("mudd", 3, {}), ("mudd", 3, {"mudd_streams": "r"}),
    ("value-embed", 4, {}), ("value-embed", 7, {"value_embed_layers": "ends"}),
    ("speedrun", 4, {}), ("pre+x0+unet+backout", 6, {}), ("pre+scales+long-skip+value-embed", 5, {}),
]


@pytest.mark.parametrize("model", ["gpt", "llama"])
@pytest.mark.parametrize("scheme, layers, options", CONFIGS)
def test_connections_are_the_ones_the_model_was_built_with(model, scheme, layers, options):
    built = meta_build(model, layers=layers, residual=scheme, residual_options=options)
    result = meta_audit(model, built)
    expected = depth_connections(built)
    assert expected, f"{scheme} at {layers} blocks should connect something"
    assert audited_connections(result) == expected
    assert result.dead == [] and result.not_run == []
    ordinary = [r for r in result.residuals if r.kind not in ACROSS_KINDS]
    assert len(ordinary) == 2 * layers + (options.get("x0_gated") is True)  # block 0's x0 gate: see below
    assert all(r.kind in KINDS for r in result.residuals)


def test_speedrun_in_full():
    """Pinned by hand from the speedrun's defaults at 4 blocks (long skip 3 -> 6 of 11 scaled: 1 -> 3; value
    embeddings in U-net order: banks 0 1 1 0), independent of the modules' attributes."""
    result = meta_audit("gpt", layers=4, residual="speedrun")
    table = "blocks.{}.attn_residual.connections.value_embed:embedding"
    connections = [r.to_dict() for r in result.residuals if r.kind in ACROSS_KINDS]
    assert connections == [
        {"owner": "blocks.0.attn", "skip_from": table.format(0),
         "wraps": ["blocks.0.attn_residual.norm", "blocks.0.attn.qkv"], "kind": "value embedding"},
        {"owner": "blocks.1.attn_residual", "skip_from": "blocks.0:in", "wraps": ["blocks.0"],
         "kind": "embedding re-injection"},
        {"owner": "blocks.1.attn", "skip_from": table.format(1),
         "wraps": ["blocks.1.attn_residual.norm", "blocks.1.attn.qkv"], "kind": "value embedding"},
        {"owner": "blocks.2.attn_residual", "skip_from": "blocks.0:in", "wraps": ["blocks.0", "blocks.1"],
         "kind": "embedding re-injection"},
        {"owner": "blocks.2.attn", "skip_from": table.format(1),
         "wraps": ["blocks.2.attn_residual.norm", "blocks.2.attn.qkv"], "kind": "value embedding"},
        {"owner": "blocks.3.attn_residual", "skip_from": "blocks.0:in", "wraps": ["blocks.0", "blocks.1", "blocks.2"],
         "kind": "embedding re-injection"},
        {"owner": "blocks.3.attn_residual", "skip_from": "blocks.1:out", "wraps": ["blocks.2"], "kind": "long skip"},
        {"owner": "blocks.3.attn", "skip_from": table.format(0),
         "wraps": ["blocks.3.attn_residual.norm", "blocks.3.attn.qkv"], "kind": "value embedding"},
    ]
    # the blocks' own residuals are scales' a x + b F(LN x), around attention and the FFN, none identity
    assert [r.kind for r in result.residuals if r.kind not in ACROSS_KINDS] == ["scaled"] * 8


def test_backout_dense_and_mudd_by_hand():
    backout = meta_audit("llama", layers=4, residual="backout")
    assert [r.to_dict() for r in backout.residuals if r.kind in ACROSS_KINDS] == [
        {"owner": "stream.head_parts.0", "skip_from": "blocks.1:out", "wraps": ["blocks.2", "blocks.3"],
         "kind": "backout"}]  # 8 * 4 // 11 - 1 = 1: h_1 subtracted before the final norm
    assert "outside blocks: 1 residual — backout from blocks.1:out in stream.head_parts.0" in backout.lines()
    dense = meta_audit("gpt", layers=3, residual="denseformer")
    assert [(r.owner, r.skip_from) for r in dense.residuals if r.kind == "dense"] == [
        ("blocks.0.ffn_residual", "blocks.0:in"),
        ("blocks.1.ffn_residual", "blocks.0:in"), ("blocks.1.ffn_residual", "blocks.0:out"),
        ("blocks.2.ffn_residual", "blocks.0:in"), ("blocks.2.ffn_residual", "blocks.0:out"),
        ("blocks.2.ffn_residual", "blocks.1:out")]
    mudd = meta_audit("gpt", layers=3, residual="mudd")
    assert [(r.owner, r.skip_from) for r in mudd.residuals if r.kind == "dense"] == \
        [(r.owner, r.skip_from) for r in dense.residuals if r.kind == "dense"]  # the same sources, weighed by x
    # under qkvr block i's attention reads Q, K, V; its skip is R, the row of the same mix block i-1 made
    assert [(r.owner, r.skip_from) for r in mudd.residuals if r.kind == "multi-stream"] == [
        ("blocks.1.attn_residual", "blocks.0:out"), ("blocks.2.attn_residual", "blocks.1:out")]


@pytest.mark.parametrize("source, destination", [(1, 2), (0, 1)])
def test_a_skip_into_the_next_block_only_rescales(source, destination):
    """Block d-1's output is what block d receives: x + w h_(d-1) = (1 + w) x connects nothing across depth; the
    audit reports no connection there, and the block keeps its two residuals."""
    options = {"long_skip_from": source, "long_skip_to": destination}
    result = meta_audit("gpt", layers=4, residual="long-skip", residual_options=options)
    assert [r.kind for r in result.residuals] == ["identity"] * 8


def test_the_first_block_has_no_re_injection():
    """At block 0 the stream is x0 itself: `x + c x0` rescales it (no residual); with a gate `(c + w.x0) x0` is a
    data-dependent factor on the stream, a gated residual of block 0's own."""
    plain = meta_audit("gpt", layers=3, residual="x0")
    assert [r.kind for r in plain.residuals if r.owner == "blocks.0.attn_residual"] == ["identity"]
    gated = meta_audit("gpt", layers=3, residual="x0", residual_options={"x0_gated": True})
    first = [r.to_dict() for r in gated.residuals if r.owner == "blocks.0.attn_residual"]
    assert first[0] == {"owner": "blocks.0.attn_residual", "skip_from": "blocks.0.attn_residual:in",
                        "wraps": ["blocks.0.attn_residual"], "kind": "gated",  # the gate w.x0 per token, times x0
                        "mixing": [{"on": "branch", "role": "gate", "shape": [1, 8, 1]},
                                   {"on": "branch", "role": "gate", "shape": [1, 8, 128]}]}


def test_value_residual_is_no_connection_across_depth():
    """value-residual's v_1 leaves blocks.0 inside its attention, before the block's end: not a block output."""
    result = meta_audit("gpt", layers=4, residual="value-residual")
    assert {r.kind for r in result.residuals if r.owner.endswith(".attn")} == {"scaled"}
    assert not [r for r in result.residuals if r.kind in ACROSS_KINDS]


def test_blocks_that_are_branches_carry_no_connection():
    """The book's MLP adds `x + layer_i(x)` outside each block layers.i: the skip is block i's input and the branch
    the block itself, an ordinary residual around it, not a skip over a block that carries the stream."""
    result = audit(reslab.build_model("mlp"), (torch.ones(1, 3),))
    assert [b.path for b in result.blocks] == [f"layers.{i}" for i in range(5)]
    assert [(r.kind, r.skip_from) for r in result.residuals] == [("identity", f"shortcuts.{i}:in") for i in range(4)]


def test_audit_on_cpu_reads_the_same():
    """On CPU (real kernels, `torch.addcmul` as one op) the audit says what it says on meta."""
    torch.manual_seed(0)
    for scheme in ("mudd", "speedrun", "backout"):
        model = reslab.build_model("gpt", layers=3, residual=scheme, vocab_size=65)
        result = audit(model, (torch.zeros(1, 8, dtype=torch.long),))
        assert audited_connections(result) == depth_connections(model), scheme


# --- the CLI, --design and the diagram ----------------------------------------------------------------------------
def test_audit_json_names_source_and_destination(cli):
    code, out, _ = cli("audit", "gpt", "--layers", "6", "--residual", "pre+unet", "--json")
    assert code == 0
    skips = [r for r in json.loads(out)["residuals"] if r["kind"] == "long skip"]
    assert [(r["owner"], r["skip_from"]) for r in skips] == [
        ("blocks.4.attn_residual", "blocks.1:out"), ("blocks.5.attn_residual", "blocks.0:out")]
    code, out, _ = cli("audit", "gpt", "--layers", "6", "--residual", "pre+unet")
    assert "blocks.5: 3 residuals — long skip from blocks.0:out in attn_residual, around attn" in out
    assert "(12 identity, 2 long skip)" in out


def write(path: Path, design) -> str:
    path.write_text(json.dumps(design))
    return str(path)


def test_design_claims_connections_and_reports_a_missing_one(cli, tmp_path):
    design = {"residuals": [{"around": "blocks.*.attn"}, {"around": "blocks.*.ffn"},
                            {"from": "blocks.*:out", "to": "blocks.5", "kind": "long skip"},
                            {"from": "blocks.1:out", "to": "blocks.4.attn_residual", "count": 1},
                            {"from": "blocks.2:out", "to": "blocks.3", "kind": "long skip"}]}
    code, out, _ = cli("audit", "gpt", "--layers", "6", "--residual", "pre+unet", "--design",
                       write(tmp_path / "d.json", design))
    assert code == 1
    assert re.search(r"implemented +from blocks\.\*:out to blocks\.5 \(kind long skip\): 1 of 1 module", out)
    assert re.search(r"implemented +from blocks\.1:out to blocks\.4\.attn_residual \(count 1\)", out)
    assert re.search(r"MISSING +from blocks\.2:out to blocks\.3 \(kind long skip\): 0 of 1 module", out)
    assert "0 unclaimed residuals" in out
    design["residuals"].pop()
    code, out, _ = cli("audit", "gpt", "--layers", "6", "--residual", "pre+unet", "--design",
                       write(tmp_path / "d.json", design))
    assert code == 0 and "design matches the code" in out


@pytest.mark.parametrize("scheme", ["speedrun", "denseformer", "mudd", "pre+x0+unet+backout"])
def test_written_design_matches_and_claims_each_connection(cli, tmp_path, scheme):
    path = tmp_path / "design.json"
    code, _, _ = cli("audit", "gpt", "--layers", "5", "--residual", scheme, "--write-design", path)
    assert code == 0
    claims = json.loads(path.read_text())["residuals"]
    across = [c for c in claims if c.get("kind") in ACROSS_KINDS]
    assert across and all("from" in c and "to" in c for c in across)
    code, out, _ = cli("audit", "gpt", "--layers", "5", "--residual", scheme, "--design", path)
    assert code == 0 and "design matches the code" in out
    # the same design against the model without its connections: each claim across depth is missing
    code, out, _ = cli("audit", "gpt", "--layers", "5", "--residual", "pre", "--design", path)
    assert code == 1 and out.count("MISSING") >= len(across)


@pytest.mark.parametrize("claim", [{"from": "blocks.*:out"}, {"from": "blocks.x*:out", "to": "blocks.3"},
                                   {"from": "blocks.1:", "to": "blocks.3"}, {"from": 3, "to": "blocks.3"},
                                   {"from": "blocks.1:out", "to": "blocks.3", "around": "blocks.3.attn"}])
def test_malformed_connection_claims_are_one_line(cli, tmp_path, claim):
    code, _, err = cli("audit", "gpt", "--layers", "4", "--design", write(tmp_path / "d.json", {"residuals": [claim]}))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "claim 1" in err


def arcs(svg_file: Path) -> list[str]:
    """The titles of the arcs of connections across depth in an SVG the diagram wrote."""
    root = ET.parse(svg_file).getroot()
    return [p.find(f"{SVG}title").text for p in root.iter(f"{SVG}path") if "across" in (p.get("class") or "")]


def test_diagram_draws_one_arc_across_folded_blocks(cli, tmp_path):
    """U-net at 8 blocks: blocks 0-3 fold into one frame, 5-7 into another (block 4 starts with the rescale
    `x + w h_3`); the three skips 2->5, 1->6, 0->7 are one arc between the two frames, naming all three; unrolled,
    three arcs."""
    code, _, _ = cli("diagram", "gpt", "--layers", "8", "--residual", "pre+unet", "-o", tmp_path / "f.svg")
    assert code == 0
    assert arcs(tmp_path / "f.svg") == ["long skip: blocks.2:out → blocks.5, blocks.1:out → blocks.6, "
                                        "blocks.0:out → blocks.7"]
    svg = (tmp_path / "f.svg").read_text()
    assert "× 4" in svg and "× 3" in svg
    code, _, _ = cli("diagram", "gpt", "--layers", "8", "--residual", "pre+unet", "--unroll", "-o", tmp_path / "u.svg")
    assert sorted(arcs(tmp_path / "u.svg")) == [f"long skip: blocks.{s}:out → blocks.{7 - s}" for s in range(3)]
    code, _, _ = cli("diagram", "gpt", "--layers", "8", "--residual", "pre+unet", "-o", tmp_path / "f.mmd")
    assert "|\"long skip: blocks.2:out → blocks.5, blocks.1:out → blocks.6, blocks.0:out → blocks.7\"|" in \
        (tmp_path / "f.mmd").read_text()


def test_diagram_draws_a_missing_connection_claim(cli, tmp_path):
    design = {"residuals": [{"around": "blocks.*.attn"}, {"around": "blocks.*.ffn"},
                            {"from": "blocks.0:in", "to": "blocks.2", "kind": "embedding re-injection"}]}
    code, out, _ = cli("diagram", "gpt", "--layers", "3", "--design", write(tmp_path / "d.json", design),
                       "-o", tmp_path / "d.svg")
    assert code == 0 and "MISSING      from blocks.0:in to blocks.2" in out
    root = ET.parse(tmp_path / "d.svg").getroot()
    claimed = [p.find(f"{SVG}title").text for p in root.iter(f"{SVG}path") if p.get("stroke") == "#d62728"]
    assert claimed == ["claimed by the design, missing in the code: from blocks.0:in to blocks.2 "
                       "(kind embedding re-injection)"]


def test_every_kind_is_defined_in_the_docs():
    text = (Path(__file__).parent.parent / "docs" / "audit.md").read_text()
    for kind in KINDS:
        assert re.search(rf"^\| `{re.escape(kind)}` \| \S", text, re.MULTILINE), f"docs/audit.md: no row for {kind}"
