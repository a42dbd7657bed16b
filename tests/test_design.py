"""Design against code: `reslab audit --design`, `--write-design`, `reslab diagram --design` and `assert_design`,
checked on Hugging Face models reslab did not write as well as on its own."""

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from reslab.errors import ReslabError
from reslab.testing import assert_design

SVG = "{http://www.w3.org/2000/svg}"
RED = "#d62728"
# MiniMind's diagram, in Hugging Face Llama's module names: residuals around and inside attention and MLP.
MINIMIND_HF = {"residuals": [{"around": "model.layers.*.self_attn"}, {"around": "model.layers.*.mlp"},
                             {"inside": "model.layers.*.self_attn"}, {"inside": "model.layers.*.mlp"}]}
AROUND_HF = {"residuals": MINIMIND_HF["residuals"][:2]}


def write(path, design) -> str:
    path.write_text(json.dumps(design))
    return str(path)


def claimed_paths(svg_file) -> list[ET.Element]:
    """The dashed red edges of an SVG: claims the code lacks."""
    root = ET.parse(svg_file).getroot()
    return [p for p in root.iter(f"{SVG}path") if p.get("stroke") == RED and p.get("stroke-dasharray")]


def title(element: ET.Element) -> str:
    found = element.find(f"{SVG}title")
    return "" if found is None else found.text or ""


# --- reslab audit --design ---------------------------------------------------------------------------------------
def test_hf_llama_lacks_minimind_inside_claims(cli, tmp_path):
    code, out, _ = cli("audit", "hf:llama", "--design", write(tmp_path / "d.json", MINIMIND_HF))
    assert code == 1
    # HF's decoder layer adds both residuals in its own forward: around attention and MLP, none inside them
    assert re.search(r"implemented +around model\.layers\.\*\.self_attn: 2 of 2 modules, 2 residuals", out)
    assert re.search(r"implemented +around model\.layers\.\*\.mlp: 2 of 2 modules, 2 residuals", out)
    assert re.search(r"MISSING +inside model\.layers\.\*\.self_attn: 0 of 2 modules, 0 residuals", out)
    assert re.search(r"MISSING +inside model\.layers\.\*\.mlp: 0 of 2 modules", out)
    assert "2 of 4 claims implemented, 0 unclaimed residuals" in out and "design and code differ" in out


def test_design_json_is_one_document(cli, tmp_path):
    code, out, _ = cli("audit", "hf:llama", "--json", "--design", write(tmp_path / "d.json", MINIMIND_HF))
    assert code == 1
    result = json.loads(out)
    assert len(result["residuals"]) == 4  # the audit is all there
    design = result["design"]
    assert design["matches"] is False and design["unclaimed"] == []
    assert [c["implemented"] for c in design["claims"]] == [True, True, False, False]
    assert design["claims"][2]["lacking"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert design["claims"][0]["found"] == {"model.layers.0.self_attn": 1, "model.layers.1.self_attn": 1}


def test_matching_design_exits_0(cli, tmp_path):
    code, out, _ = cli("audit", "hf:llama", "--design", write(tmp_path / "d.json", AROUND_HF))
    assert code == 0 and "design matches the code" in out and "MISSING" not in out


def test_residuals_no_claim_covers_are_listed(cli, tmp_path):
    design = {"residuals": [{"around": "model.layers.*.self_attn"}]}
    code, out, _ = cli("audit", "hf:llama", "--design", write(tmp_path / "d.json", design))
    assert code == 1
    unclaimed = [line for line in out.splitlines() if "UNCLAIMED" in line]
    assert len(unclaimed) == 2 and all("mlp" in line for line in unclaimed)
    assert "model.layers.0.mlp" in unclaimed[0] and "model.layers.1.mlp" in unclaimed[1]


@pytest.mark.parametrize("claim, why", [
    ({"around": "model.layers.*.mlp", "count": 2}, "claimed 2 each"),  # one residual each, not two
    ({"around": "model.layers.*.mlp", "kind": "scaled"}, "0 of 2 modules"),  # HF Llama's skips are plain identity
    ({"inside": "encoder.*"}, "no module matches 'encoder.*'"),
])
def test_counts_kinds_and_unknown_modules_are_differences(cli, tmp_path, claim, why):
    design = {"residuals": [{"around": "model.layers.*.self_attn"}, {"around": "model.layers.*.mlp"}, claim]}
    code, out, _ = cli("audit", "hf:llama", "--design", write(tmp_path / "d.json", design))
    assert code == 1
    missing = [line for line in out.splitlines() if "MISSING" in line]
    assert len(missing) == 1 and why in missing[0]


def test_reslab_llama_residuals_sit_in_its_residual_sites(cli, tmp_path):
    """reslab's own blocks add in `attn_residual`, a sibling of `attn`: around attn, inside the block, not in attn."""
    design = {"residuals": [{"around": "blocks.*.attn", "count": 1}, {"inside": "blocks.*", "count": 2},
                            {"inside": "blocks.*.attn_residual", "kind": "identity"}]}
    code, out, _ = cli("audit", "llama", "--layers", "3", "--design", write(tmp_path / "d.json", design))
    assert code == 0, out


BAD_DESIGNS = [
    ("{not json", "is not valid JSON"),
    ('{"residuals": [], "claims": []}', "unknown key 'claims'"),
    ('{"residuals": [{"arround": "layers.*.mlp"}]}', "claim 1: unknown key 'arround'"),
    ('{"residuals": [{"around": "a", "inside": "b"}]}', "exactly one of 'around' or 'inside'"),
    ('{"residuals": [{"around": "layers.*.mlp", "kind": "skip"}]}', "unknown kind 'skip'"),
    ('{"residuals": [{"around": "layers..mlp"}]}', "a '*' standing for one whole path component"),
    ('{"residuals": [{"around": "layers.*.mlp", "count": 0}]}', "count must be a positive integer"),
    ('{"residuals": [{"around": "layers.*.mlp", "count": "2"}]}', "count must be a positive integer"),
    ('{"residuals": [{"around": "layers.*.mlp", "count": true}]}', "count must be a positive integer"),
    ('{"residuals": [{"around": "layer*.mlp"}]}', "one whole path component"),
    ('{"residuals": {"around": "layers.*.mlp"}}', "needs \"residuals\": a list"),
    ('[{"around": "layers.*.mlp"}]', "must be a JSON object"),
]


@pytest.mark.parametrize("text, message", BAD_DESIGNS)
@pytest.mark.parametrize("command", ["audit", "diagram"])
def test_malformed_design_is_one_line_and_exit_2(cli, tmp_path, text, message, command):
    (tmp_path / "d.json").write_text(text)
    extra = ["-o", str(tmp_path / "x.svg")] if command == "diagram" else []
    code, out, err = cli(command, "gpt", "--design", tmp_path / "d.json", *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("reslab: error: ")
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.parametrize("which, message", [("missing", "no design file"), ("dir", "is a directory")])
def test_missing_design_file_or_directory_is_exit_2(cli, tmp_path, which, message):
    path = tmp_path / "nothere.json" if which == "missing" else tmp_path
    code, _, err = cli("audit", "gpt", "--design", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# --- reslab audit --write-design ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target, flags", [("hf:llama", []), ("llama", ["--layers", "3"]), ("mlp", []),
                                           ("hf:gpt2", []), ("gpt", ["--residual", "none"])])
def test_written_design_passes(cli, tmp_path, target, flags):
    path = tmp_path / "design.json"
    code, out, _ = cli("audit", target, *flags, "--write-design", path)
    assert code == 0 and f"wrote {path}" in out
    code, out, _ = cli("audit", target, *flags, "--design", path)
    assert code == 0, out


def test_written_design_generalises_layers_only_when_they_agree(cli, tmp_path):
    path = tmp_path / "design.json"
    cli("audit", "hf:llama", "--set", "num_hidden_layers=3", "--write-design", path)
    claims = json.loads(path.read_text())["residuals"]
    assert {"around": "model.layers.*.self_attn", "kind": "identity", "count": 1} in claims
    assert {"around": "model.layers.*.mlp", "kind": "identity", "count": 1} in claims and len(claims) == 2
    # the book's MLP has no shortcut around its last layer (3 -> 1): no `*`, one claim per layer that has one
    cli("audit", "mlp", "--write-design", path)
    claims = json.loads(path.read_text())["residuals"]
    assert [c["around"] for c in claims] == ["layers.0", "layers.1", "layers.2", "layers.3"]


def test_written_design_catches_a_removed_residual(cli, tmp_path):
    path = tmp_path / "design.json"
    cli("audit", "llama", "--layers", "2", "--write-design", path)
    code, out, _ = cli("audit", "llama", "--layers", "2", "--residual", "none", "--design", path)
    assert code == 1
    assert len([line for line in out.splitlines() if "MISSING" in line]) == 2


# --- reslab diagram --design -------------------------------------------------------------------------------------
def test_diagram_dashes_missing_claims_at_their_module(cli, tmp_path):
    svg = tmp_path / "out.svg"
    code, out, _ = cli("diagram", "hf:llama", "--design", write(tmp_path / "d.json", MINIMIND_HF), "-o", svg)
    assert code == 0 and "MISSING" in out
    dashed = claimed_paths(svg)
    assert sorted(title(p).rpartition(": ")[2] for p in dashed) == ["inside model.layers.*.mlp",
                                                                     "inside model.layers.*.self_attn"]
    assert not any("around" in title(p) for p in dashed)  # the implemented claims are drawn as usual
    # the loop for `inside self_attn` starts and ends on the right side of the self_attn box
    root = ET.parse(svg).getroot()
    box = next(g.find(f"{SVG}rect") for g in root.iter(f"{SVG}g") if title(g) == "model.layers.0.self_attn")
    top, bottom = float(box.get("y")), float(box.get("y")) + float(box.get("height"))
    right = float(box.get("x")) + float(box.get("width"))
    loop = next(p for p in dashed if "self_attn" in title(p))
    points = [tuple(map(float, xy.split(","))) for xy in re.findall(r"[\d.]+,[\d.]+", loop.get("d"))]
    assert points[0][0] == pytest.approx(right) and points[-1][0] == pytest.approx(right)
    assert top <= points[0][1] < points[-1][1] <= bottom
    legend = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert any(line.startswith("red dashed: claimed by the design") for line in legend)


def test_diagram_of_a_matching_design_has_no_dashed_red_edge(cli, tmp_path):
    svg = tmp_path / "out.svg"
    code, _, _ = cli("diagram", "hf:llama", "--design", write(tmp_path / "d.json", AROUND_HF), "-o", svg)
    assert code == 0 and claimed_paths(svg) == []
    root = ET.parse(svg).getroot()
    assert not any("unclaimed" in (c.get("class") or "") for c in root.iter(f"{SVG}circle"))
    assert not any("claimed by the design" in "".join(t.itertext()) for t in root.iter(f"{SVG}text"))


def test_missing_around_claim_skips_over_the_module(cli, tmp_path):
    """Without residuals, `around attn` is drawn from what feeds attn to what reads it, not as a loop on attn."""
    svg = tmp_path / "out.svg"
    design = write(tmp_path / "d.json", {"residuals": [{"around": "blocks.*.attn"}]})
    code, _, _ = cli("diagram", "llama", "--layers", "2", "--residual", "none", "--design", design, "-o", svg)
    assert code == 0
    (edge,) = claimed_paths(svg)
    assert title(edge).endswith("around blocks.*.attn")
    root = ET.parse(svg).getroot()
    box = next(g.find(f"{SVG}rect") for g in root.iter(f"{SVG}g") if title(g) == "blocks.0.attn")
    first_y = float(re.findall(r"[\d.]+,([\d.]+)", edge.get("d"))[0])
    last_y = float(re.findall(r"[\d.]+,([\d.]+)", edge.get("d"))[-1])
    assert first_y < float(box.get("y")) and last_y > float(box.get("y")) + float(box.get("height"))


def test_unclaimed_residuals_are_highlighted(cli, tmp_path):
    svg = tmp_path / "out.svg"
    design = write(tmp_path / "d.json", {"residuals": [{"around": "model.layers.*.self_attn"}]})
    cli("diagram", "hf:llama", "--design", design, "-o", svg, "--unroll")
    root = ET.parse(svg).getroot()
    circles = [c.get("class") for c in root.iter(f"{SVG}circle")]
    assert sorted(circles) == ["add", "add", "add unclaimed", "add unclaimed"]
    skips = [p for p in root.iter(f"{SVG}path") if "skip" in (p.get("class") or "")]
    assert sorted(p.get("class") for p in skips) == ["skip", "skip", "skip unclaimed", "skip unclaimed"]
    assert all("mlp" not in title(p) for p in skips)  # titles name the kind; the check names the modules


@pytest.mark.parametrize("suffix, expected", [
    (".mmd", ['-.->|"claimed, missing: inside model.layers.*.self_attn"|', "stroke:#d62728", "stroke-dasharray"]),
    (".dot", ['label="claimed, missing: inside model.layers.*.mlp"', 'style="dashed", color="#d62728"']),
])
def test_mermaid_and_dot_show_missing_claims(cli, tmp_path, suffix, expected):
    out = tmp_path / f"out{suffix}"
    code, _, _ = cli("diagram", "hf:llama", "--design", write(tmp_path / "d.json", MINIMIND_HF), "-o", out)
    assert code == 0
    text = out.read_text()
    assert all(fragment in text for fragment in expected)
    assert "claimed, missing: around" not in text


# --- assert_design in a user's test ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_causal_lm(request):
    """A tiny LlamaForCausalLM / Qwen2ForCausalLM with random weights, on CPU, and its inputs."""
    transformers = pytest.importorskip("transformers")
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[request.param]
    config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return model_class(config).eval(), {"input_ids": torch.zeros(1, 6, dtype=torch.long)}


def test_assert_design_reports_the_inside_claims_missing(hf_causal_lm):
    model, inputs = hf_causal_lm
    design = {"residuals": [{"around": "model.layers.*.self_attn"}, {"around": "model.layers.*.mlp"},
                            {"inside": "model.layers.*.self_attn"}, {"inside": "model.layers.*.mlp"}]}
    with pytest.raises(AssertionError) as failure:
        assert_design(model, inputs, design)
    message = str(failure.value)
    assert message.startswith("the code differs from the design:")
    assert re.search(r"MISSING +inside model\.layers\.\*\.self_attn: 0 of 2 modules", message)
    assert re.search(r"MISSING +inside model\.layers\.\*\.mlp: 0 of 2 modules", message)
    assert not re.search(r"MISSING +around", message)


def test_assert_design_passes_from_a_dict_or_a_file(hf_causal_lm, tmp_path):
    model, inputs = hf_causal_lm
    design = {"residuals": [{"around": "model.layers.*.self_attn", "count": 1},
                            {"around": "model.layers.*.mlp", "kind": "identity"}]}
    check = assert_design(model, inputs, design)
    assert check.ok and len(check.results) == 2
    assert assert_design(model, inputs, write(tmp_path / "d.json", design)).ok


def test_assert_design_rejects_a_malformed_design_before_tracing():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ReslabError, match="unknown key 'arround'"):
        assert_design(model, (torch.zeros(1, 2),), {"residuals": [{"arround": "x"}]})


def test_python_api_draws_a_design_on_a_users_module(tmp_path):
    from reslab.graph import audit, check_design
    from reslab.graph.diagram import diagram

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

        def forward(self, x):
            return x + self.mlp(x)

    model, inputs = torch.nn.Sequential(Block(), Block()), (torch.zeros(1, 4),)
    design = {"residuals": [{"around": "*.mlp", "count": 1}, {"inside": "*.mlp"}]}
    check = check_design(audit(model, inputs), design)
    assert [r.implemented for r in check.results] == [True, False] and check.unclaimed == []
    path = diagram(model, inputs, design=design, unroll=True).save(tmp_path / "d.svg")
    assert len(claimed_paths(path)) == 2  # `inside *.mlp` missing in each of the two blocks
