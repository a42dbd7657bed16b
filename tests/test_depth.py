"""Connections across depth, the extension point (`reslab/residual/depth/base.py`): composition by name, the
refusals, and the two connections the speedrun starts with (x0 injection, residual scales) against formulas worked
out here from the model's own blocks. Each connection's own file has its own tests (tests/test_depth_*.py)."""

import json

import pytest
import torch

import reslab
from reslab.errors import ReslabError
from reslab.registry import load
from reslab.residual import get_scheme, list_schemes
from reslab.residual.depth.base import Connection, DepthStream

SMALL = {"width": 32, "heads": 2, "layers": 3, "vocab_size": 65, "context": 16}


def build(model: str, residual: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    return reslab.build_model(model, **{**SMALL, **config, "residual": residual})


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(seed))


def by_hand(model, idx: torch.Tensor, before_block, update) -> torch.Tensor:
    """The model's logits computed from its own embedding, sublayers and head: `before_block(i, x, x0) -> x` at the
    start of block i and `update(site, x, sublayer) -> x` at every sublayer."""
    x0 = model.drop(model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1])))
    x = x0
    for i, block in enumerate(model.blocks):
        x = before_block(i, x, x0)
        for site, sublayer in block.sites():
            x = update(site, x, sublayer)
    return model.head(model.norm(x))


def pre_update(site, x, sublayer):
    return x + sublayer(site.norm(x))


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_x0_and_scales_at_their_neutral_init_are_pre_ln_exactly(model):
    """x0 starts at c = 0 and scales set to (1, 1) is pre-LN's update: the same logits as `pre`, for the same seed
    (a connection's parameters draw no random numbers)."""
    idx = tokens()
    reference = build(model, "pre")(idx).logits
    composed = build(model, "pre+scales+x0", residual_options={"scales_resid_init": 1.0, "scales_branch_init": 1.0})
    assert torch.equal(composed(idx).logits, reference)


def test_x0_adds_the_embedding_scaled_by_each_blocks_coefficient():
    model = build("gpt", "x0")
    coefficients = [0.3, -0.7, 1.5]
    with torch.no_grad():
        for block, c in zip(model.blocks, coefficients):
            block.attn_residual.connections["x0"].coefficient.fill_(c)
    idx = tokens()
    expected = by_hand(model, idx, lambda i, x, x0: x + coefficients[i] * x0, pre_update)
    torch.testing.assert_close(model(idx).logits, expected, rtol=0, atol=1e-6)


def test_a_gated_x0_coefficient_depends_on_the_token():
    model = build("gpt", "x0", residual_options={"x0_gated": True})
    gates = [torch.randn(12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        for block, gate in zip(model.blocks, gates):
            block.attn_residual.connections["x0"].gate.copy_(gate)

    def gated(i, x, x0):
        return x + (x0[..., :12] @ gates[i]).unsqueeze(-1) * x0

    idx = tokens()
    torch.testing.assert_close(model(idx).logits, by_hand(model, idx, gated, pre_update), rtol=0, atol=1e-6)


def test_scales_multiply_the_stream_and_the_branch_per_sublayer():
    model = build("gpt", "scales")
    values = {}
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            for index, (site, _) in enumerate(block.sites()):
                part = site.connections["scales"]
                part.resid.fill_(0.9 + 0.1 * layer)
                part.branch.fill_(1.3 - 0.2 * index)
                values[id(site)] = (0.9 + 0.1 * layer, 1.3 - 0.2 * index)

    def scaled(site, x, sublayer):
        a, b = values[id(site)]
        return a * x + b * sublayer(site.norm(x))

    idx = tokens()
    torch.testing.assert_close(model(idx).logits, by_hand(model, idx, lambda i, x, x0: x, scaled), rtol=0, atol=1e-6)


def test_default_scales_grow_the_stream_by_1_1_per_block():
    """The speedrun's init (train_gpt.py:1336-1338): sqrt(1.1) per sublayer, so each block multiplies by 1.1."""
    model = build("gpt", "scales")
    a = [site.connections["scales"].resid.item() for _, _, site in model.residual_sites()]
    assert a == pytest.approx([1.1 ** 0.5] * 6)
    assert [site.connections["scales"].branch.item() for _, _, site in model.residual_sites()] == [1.0] * 6


def test_the_learned_coefficients_are_trained_and_reported():
    model = build("gpt", "scales+x0")
    model(tokens()).logits.square().mean().backward()
    site = model.blocks[1].attn_residual
    for parameter in (site.connections["x0"].coefficient, site.connections["scales"].resid,
                      site.connections["scales"].branch):
        assert parameter.grad is not None and parameter.grad.abs().item() > 0
    sites = [site for _, _, site in model.residual_sites()]
    found = type(sites[0]).scheme_metrics(sites)["depth_coefficients"]
    assert set(found) == {"scales", "x0"}
    assert len(found["scales"]["a"]) == 6 and len(found["x0"]["c"]) == 3  # x0 only at each block's start


def test_a_connection_alone_is_on_pre_and_keeps_pre_parameter_names():
    pre, alone = build("llama", "pre"), build("llama", "x0")
    extra = set(dict(alone.named_parameters())) - set(dict(pre.named_parameters()))
    assert extra == {f"blocks.{i}.attn_residual.connections.x0.coefficient" for i in range(3)}
    assert get_scheme("x0").base is get_scheme("pre") and get_scheme("x0").name == "x0"


def test_a_connection_composes_with_another_single_stream_scheme():
    model = build("gpt", "sandwich+x0")
    assert type(model.blocks[0].attn_residual).base is get_scheme("sandwich")
    assert model(tokens()).logits.isfinite().all()


@pytest.mark.parametrize("name, message", [
    ("hc+x0", "connections across depth compose with single-stream schemes; 'hc' carries its own stream"),
    ("pre+sandwich", "names two schemes, 'pre' and 'sandwich'"),
    ("pre+x0+x0", "names connection 'x0' twice"),
    ("post+scales", "connection 'scales' replaces pre-LN's update and composes only with 'pre'"),
    ("pre+nonesuch", "unknown residual scheme 'nonesuch'"),
    ("pre+", "no empty part"), ("pre++x0", "no empty part"), ("pre + x0", "no spaces"),
])
def test_a_composition_that_cannot_be_built_is_one_line(name, message):
    with pytest.raises(ReslabError, match="^[^\n]*$") as error:
        get_scheme(name)
    assert message in str(error.value)


def test_options_of_a_composition_are_checked_by_their_owner():
    scheme = get_scheme("pre+x0")
    with pytest.raises(ReslabError, match="has no option 'streams'"):
        scheme.resolve_options({"streams": 2})
    with pytest.raises(ReslabError, match="x0_init must be a number in"):
        scheme.resolve_options({"x0_init": "big"})
    assert scheme.resolve_options({"x0_init": 0.5})["x0_init"] == 0.5


def test_a_site_called_alone_takes_and_returns_a_plain_stream():
    model = build("gpt", "x0")
    site, sublayer = model.blocks[1].sites()[0]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        site.connections["x0"].coefficient.fill_(0.5)
    out = site(x, sublayer)  # alone, the stream it is given is also its x0
    torch.testing.assert_close(out, 1.5 * x + sublayer(site.norm(1.5 * x)), rtol=0, atol=1e-6)


def test_the_depth_stream_is_never_changed_in_place():
    """The lens keeps the stream of every site: a later site must not change what an earlier one passed on."""
    stream = DepthStream(torch.zeros(1), torch.zeros(1), None, {})
    saved = stream.save("blocks.0:out", torch.ones(1))
    assert stream.saved == {} and set(saved.saved) == {"blocks.0:out"}


def test_every_connection_is_listed_with_its_formula_and_paper(cli):
    code, out, _ = cli("list")
    assert code == 0
    for name in ("scales", "x0", "unet", "long-skip", "value-embed", "backout", "denseformer", "mudd", "speedrun"):
        assert name in list_schemes()
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name)
        scheme = load("residual scheme", name)
        assert scheme.formula in line, line
    for name in ("scales", "x0", "unet", "long-skip", "value-embed", "backout", "denseformer", "mudd"):
        connection = load("residual scheme", name)
        assert issubclass(connection, Connection) and connection.reference and connection.kind


def test_training_logs_the_coefficients_as_a_model_metric(cli, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16",
                       "--batch", "4", "--steps", "4", "--log-interval", "2", "--eval-interval", "4",
                       "--residual", "pre+scales+x0", "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["depth_coefficients"] for r in records if "depth_coefficients" in r]
    assert logged and set(logged[-1]) == {"scales", "x0"}
    assert logged[-1]["scales"]["a"][0] != pytest.approx(1.1 ** 0.5, abs=1e-7)  # trained away from its init
