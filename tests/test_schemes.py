"""Each residual scheme's formula, checked on small cases by hand, and the registry's one-file-one-line promise."""

import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.nn import MLP, CausalSelfAttention, make_norm
from reslab.residual import SCHEMES, SiteSpec, get_scheme

WIDTH = 8


class Affine(nn.Module):
    """A parameter-free sublayer with a known formula: F(x) = 2x + 1."""

    def forward(self, x):
        return 2 * x + 1


class Zero(nn.Module):
    """A sublayer whose output ignores its input, to expose whether a scheme has a bypass path."""

    def forward(self, x):
        return x * 0.0  # keeps the graph, so d(out)/d(x) exists and is zero through this branch


def site(name: str, layers: int = 4, **options):
    spec = SiteSpec(layer=0, index=0, num_layers=layers, width=WIDTH, make_norm=make_norm("layernorm"), options=options)
    return get_scheme(name)(spec)


def ln(x):
    return F.layer_norm(x, (WIDTH,))


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, WIDTH)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("none", lambda x: 2 * ln(x) + 1),
        ("post", lambda x: ln(x + 2 * x + 1)),
        ("pre", lambda x: x + 2 * ln(x) + 1),
        ("sandwich", lambda x: x + ln(2 * ln(x) + 1)),
        ("add", lambda x: x + 2 * x + 1),
        ("article-edit", lambda x: ln(x)),
    ],
)
def test_formula_holds(name, expected, x):
    torch.testing.assert_close(site(name)(x, Affine()), expected(x))


def test_rezero_is_identity_at_init_and_scales_by_alpha(x):
    rezero = site("rezero")
    assert rezero.alpha.item() == 0.0
    torch.testing.assert_close(rezero(x, Affine()), x)
    with torch.no_grad():
        rezero.alpha.fill_(0.5)
    torch.testing.assert_close(rezero(x, Affine()), x + 0.5 * (2 * x + 1))


@pytest.mark.parametrize("layers, init", [(6, 0.1), (18, 0.1), (24, 1e-5), (36, 1e-6)])
def test_layerscale_init_follows_cait_rule(layers, init, x):
    scale = site("layerscale", layers=layers)
    assert torch.all(scale.scale == init) and scale.scale.shape == (WIDTH,)
    torch.testing.assert_close(scale(x, Affine()), x + init * (2 * ln(x) + 1))
    assert torch.all(site("layerscale", layers=layers, layerscale_init=0.3).scale == 0.3)


@pytest.mark.parametrize("layers", [1, 6, 100])
def test_deepnorm_uses_alpha_2L_quarter(layers, x):
    deepnorm = site("deepnorm", layers=layers)
    alpha = (2 * layers) ** 0.25
    assert deepnorm.alpha == pytest.approx(alpha) and deepnorm.beta == pytest.approx((8 * layers) ** -0.25)
    torch.testing.assert_close(deepnorm(x, Affine()), ln(alpha * x + 2 * x + 1))


def test_deepnorm_branch_init_gains():
    torch.manual_seed(0)
    layers, width = 8, 256
    model = reslab.build_model("gpt", layers=layers, width=width, heads=4, residual="deepnorm")
    beta = (8 * layers) ** -0.25
    attn = model.blocks[3].attn
    roles = dict(attn.branch_weights())
    xavier = lambda w, gain: gain * math.sqrt(2.0 / sum(w.shape))  # noqa: E731
    for role, gain in [("q", 1.0), ("k", 1.0), ("v", beta), ("out", beta)]:
        assert roles[role].std().item() == pytest.approx(xavier(roles[role], gain), rel=0.05), role
    down = model.blocks[3].ffn.down.weight
    assert down.std().item() == pytest.approx(xavier(down, beta), rel=0.05)


@pytest.mark.parametrize("name", [n for n in SCHEMES])
def test_skip_path_exists_exactly_when_scheme_says_so(name, x):
    """With a sublayer that ignores its input, d(out)/d(x) is zero iff there is no path that bypasses it."""
    x = x.clone().requires_grad_(True)
    site(name)(x, Zero()).sum().backward()
    has_bypass = x.grad.abs().sum().item() > 0
    if name == "article-edit":  # its bypass is the *only* path: the sublayer's output is thrown away
        assert has_bypass
    else:
        assert has_bypass == get_scheme(name).has_skip


def test_none_output_depends_only_on_the_sublayer(x):
    """`none` has no path from input to output that bypasses the sublayer: x enters only through F."""
    out = site("none")(x, Zero())
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_builds_trains_a_step_for_every_transformer(model, name):
    torch.manual_seed(0)
    net = reslab.build_model(model, residual=name, layers=2, width=32, heads=2, context=16, vocab_size=11)
    idx = torch.randint(0, 11, (3, 16))
    logits = net(idx).logits
    assert logits.shape == (3, 16, 11)
    loss = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in net.named_parameters():
        if name == "article-edit" and (".attn." in pname or ".ffn." in pname):
            assert p.grad is None, pname  # the edit discards the sublayers: nothing flows back into them
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    sites = [type(s).name for _, _, s in net.residual_sites()]
    assert sites == [name] * 4


def test_scheme_options_are_checked():
    with pytest.raises(reslab.ReslabError, match="scheme 'pre' has no option 'layerscale_init'"):
        reslab.build_model("gpt", residual="pre", residual_options={"layerscale_init": 0.1})


def test_new_scheme_is_one_file_plus_one_registry_line(monkeypatch, x):
    """Register a scheme from a brand-new module; every transformer uses it with no model edit."""
    from reslab.residual.base import ResidualSite

    class HalfSkip(ResidualSite):
        name, formula, paper = "half", "x = 0.5 x + F(LN(x))", "test"

        def __init__(self, spec):
            super().__init__(spec)
            self.norm = spec.make_norm(spec.width)

        def forward(self, x, sublayer):
            fx = sublayer(self.norm(x))
            out = 0.5 * x + fx
            self.observe(x, fx, out)
            return out

    module = types.ModuleType("reslab_test_half_scheme")
    module.HalfSkip = HalfSkip
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(SCHEMES, "half", f"{module.__name__}:HalfSkip")
    for model in ("tiny", "gpt", "llama"):
        net = reslab.build_model(model, residual="half", layers=1, width=16, heads=2, vocab_size=5)
        assert isinstance(net.blocks[0].attn_residual, HalfSkip)
        assert net(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 5)
    torch.testing.assert_close(site("half")(x, Affine()), 0.5 * x + 2 * ln(x) + 1)


def test_sites_wrap_real_sublayers_in_models():
    """Models route every sublayer through a site: swapping the site's formula changes the model."""
    gpt = reslab.build_model("gpt", layers=2)
    for block in gpt.blocks:
        assert isinstance(block.attn, CausalSelfAttention) and isinstance(block.ffn, MLP)
    assert [(layer, index) for layer, index, _ in gpt.residual_sites()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
