"""Frac-connections (`frac`, arXiv 2503.14125): parity with the package that ships them (lucidrains'
hyper-connections 0.4.11, `HyperConnections(n, dim, num_fracs=m)`, weights copied by
`reslab.interop.convert_frac.load_frac_site`) for one site and a chain of sites, forward and backward, static and
dynamic; the identity init (pre-LN at init, unlike the package's); every model, the meta device, the audit, the
Amax gain, bad options and a short training run through the CLI."""

import json
import math
import re

import hyper_connections
import pytest
import torch
import torch.nn as nn

import reslab
from reslab.graph import audit
from reslab.interop.convert_frac import load_frac_site
from reslab.nn import make_norm
from reslab.probe import StreamProbe
from reslab.residual import SiteSpec, get_scheme

WIDTH, BATCH, SEQ = 32, 3, 5
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}  # the parity bounds
VARIANTS = {"dynamic": (True, True), "dynamic-linear": (True, False), "static": (False, True)}  # (dynamic, tanh)
SMALL = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 11}


def frac_site(n: int, m: int, depth: int = 0, dynamic: bool = True, tanh: bool = True, dtype=torch.float64):
    spec = SiteSpec(layer=depth // 2, index=depth % 2, num_layers=4, width=WIDTH,
                    make_norm=make_norm("rmsnorm", eps=1e-6),
                    options={"frac_streams": n, "frac_fractions": m, "frac_dynamic": dynamic, "frac_tanh": tanh})
    site = get_scheme("frac")(spec).to(dtype)
    with torch.no_grad():  # the site's own pre-norm (shared with the package's branch) away from 1
        site.norm.weight.add_(0.3 * torch.randn_like(site.norm.weight))
    return site


def package_site(n: int, m: int, depth: int, dynamic: bool, tanh: bool, dtype) -> nn.Module:
    """The package's module with every weight moved off its init, so a weight copied to the wrong place shows;
    the static variant keeps the dynamic projections at 0 (the package always has them)."""
    reference = hyper_connections.HyperConnections(n, dim=WIDTH, num_fracs=m, layer_index=depth, tanh=tanh)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if dynamic or name not in ("dynamic_alpha_fn", "dynamic_beta_fn"):
                p.add_(0.3 * torch.randn_like(p))
    return reference.to(dtype)


def sublayer(dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)).to(dtype)


def to_ours(x: torch.Tensor, n: int) -> torch.Tensor:
    """The package's (batch n, seq, D), stream index inner, as reslab's (n, batch, seq, D) (or (batch, seq, D))."""
    streams = x.unflatten(0, (-1, n)).transpose(0, 1)
    return streams[0] if n == 1 else streams


def to_package(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.transpose(0, 1).flatten(0, 1)


def package_grads(reference: nn.Module, site) -> dict[str, torch.Tensor]:
    """The package's parameter gradients in the shapes of the site's parameters they were copied into (the static
    beta is broadcast over the branch fraction, so its gradient is the site's summed over that axis)."""
    grads = {"alpha": reference.static_alpha.grad.reshape(site.alpha.shape),
             "beta": reference.static_beta.grad.reshape(site.num_streams, site.num_fracs)}
    if site.dynamic:
        grads |= {"dynamic_alpha": reference.dynamic_alpha_fn.grad.reshape(site.dynamic_alpha.shape),
                  "dynamic_beta": reference.dynamic_beta_fn.grad, "dynamic_gain": reference.norm.gamma.grad,
                  "dynamic_scale": torch.stack([reference.dynamic_alpha_scale.grad, reference.dynamic_beta_scale.grad])}
    return grads


def site_grads(site) -> dict[str, torch.Tensor]:
    grads = {name: p.grad for name, p in site.named_parameters() if not name.startswith("norm.")}
    grads["beta"] = grads["beta"].sum(0)
    return grads


def run_chain(n, m, depths, variant, dtype):
    """The same random chain of sites through the package and through reslab; returns the largest difference
    (`max_diff`) of the output stream, of the input's gradient and of every parameter's gradient."""
    torch.manual_seed(0)
    dynamic, tanh = VARIANTS[variant]
    sites, references, subs = [], [], []
    for depth in depths:
        references.append(package_site(n, m, depth, dynamic, tanh, dtype))
        sites.append(load_frac_site(frac_site(n, m, depth, dynamic, tanh, dtype), references[-1]))
        subs.append(sublayer(dtype))
    x = torch.randn(BATCH * n, SEQ, WIDTH, dtype=dtype)
    weight = torch.randn_like(x)
    x_ref, x_ours = x.clone().requires_grad_(), to_ours(x, n).clone().requires_grad_()
    out_ref, out = x_ref, x_ours
    for site, reference, sub in zip(sites, references, subs):
        branch_input, add_residual = reference(out_ref)  # the package's branch: reslab's pre-norm, then F
        out_ref = add_residual(sub(site.norm(branch_input)))
    (out_ref * weight).sum().backward()
    sub_grads = [p.grad.clone() for sub in subs for p in [*sub.parameters()]]
    for sub in subs:
        sub.zero_grad()
    for site, sub in zip(sites, subs):
        out = site(out, sub)
    (out * to_ours(weight, n)).sum().backward()
    diffs = {"forward": max_diff(to_package(out, n), out_ref), "input grad": max_diff(to_package(x_ours.grad, n),
                                                                                      x_ref.grad)}
    diffs["sublayer grads"] = max(max_diff(p.grad, g) for p, g in zip([p for s in subs for p in s.parameters()],
                                                                      sub_grads))
    diffs["site grads"] = max(max_diff(site_grads(s)[k], g) for s, r in zip(sites, references)
                              for k, g in package_grads(r, s).items())
    assert max_diff(out_ref, x) > 0.1  # the chain does change the stream
    return diffs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude where that exceeds 1: gradients
    summed over every token (a site's coefficients) or through a chain reach hundreds, and fp32 keeps ~7 digits."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# --- parity with the package --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 2)])
def test_one_site_matches_the_package(n, m, variant, dtype):
    diffs = run_chain(n, m, [3], variant, dtype)
    assert max(diffs.values()) <= TOL[dtype], diffs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n, m", [(1, 4), (2, 4)])
def test_a_chain_of_sites_matches_the_package(n, m, variant, dtype):
    diffs = run_chain(n, m, [0, 1, 2, 3, 4], variant, dtype)
    assert max(diffs.values()) <= TOL[dtype], diffs


def test_converter_refuses_what_the_site_cannot_compute():
    reference = package_site(1, 4, 0, True, True, torch.float64)
    with pytest.raises(reslab.ReslabError, match="non-zero dynamic weights.*frac_dynamic=true"):
        load_frac_site(frac_site(1, 4, dynamic=False), reference)
    with pytest.raises(reslab.ReslabError, match="reference has 1 streams of 4 fractions.*set frac_streams"):
        load_frac_site(frac_site(1, 2), reference)
    with pytest.raises(reslab.ReslabError, match="tanh=True, the site frac_tanh=False"):
        load_frac_site(frac_site(1, 4, tanh=False), reference)


# --- the init -----------------------------------------------------------------------------------------------------
def test_init_is_the_identity_per_fraction_unlike_the_packages():
    """At init our site's sublayer reads the stream itself and the stream gains exactly F; the package (m > 1)
    reads a scramble of fractions (static alpha re-split as (fraction, slot), hyper_connections.py:297) and writes
    the sum of F's fractions into every fraction. Weights copied from the package still reproduce it exactly."""
    x = torch.randn(BATCH, SEQ, WIDTH, dtype=torch.float64)
    seen = []
    site = frac_site(1, 4)
    out = site(x, Recorder(seen))
    assert torch.equal(seen[0], site.norm(x)) and torch.equal(out, x + seen[1])
    package_input, _ = hyper_connections.HyperConnections(1, dim=WIDTH, num_fracs=4, layer_index=0).double()(x)
    assert max_diff(package_input, x) > 0.1


class Recorder(nn.Module):
    """A sublayer that records what it reads and what it returns."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, h):
        self.seen += [h, torch.tanh(h)]
        return self.seen[-1]


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_one_stream_at_init_is_pre_ln_for_the_same_weights(model):
    torch.manual_seed(0)
    pre = reslab.build_model(model, residual="pre", **SMALL)
    frac = reslab.build_model(model, residual="frac", **SMALL)
    missing, unexpected = frac.load_state_dict(pre.state_dict(), strict=False)
    assert not unexpected and missing and all("_residual." in name for name in missing)
    idx = torch.randint(0, 11, (2, 16))
    assert torch.equal(frac(idx).logits, pre(idx).logits)


def test_two_streams_at_init_carry_pre_lns_stream():
    """Each stream holds pre-LN's stream; the final norm reads their sum, twice pre-LN's."""
    torch.manual_seed(0)
    pre = reslab.build_model("gpt", residual="pre", **SMALL)
    frac = reslab.build_model("gpt", residual="frac", residual_options={"frac_streams": 2}, **SMALL)
    frac.load_state_dict(pre.state_dict(), strict=False)
    idx = torch.randint(0, 11, (2, 16))
    read = [norm_input(net, idx) for net in (frac, pre)]
    torch.testing.assert_close(read[0], 2 * read[1], atol=1e-6, rtol=0)
    reads = [site.alpha[0, :, 0, 0].argmax().item() for _, _, site in frac.residual_sites()]
    assert reads == [0, 1, 0, 1]  # sublayer k reads stream k mod n, as HC's A_m = e_(k mod n)


def norm_input(model, idx) -> torch.Tensor:
    seen = []
    handle = model.norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    model(idx)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("n", [1, 2])
def test_the_stream_keeps_its_precision_under_autocast(n):
    """Like pre-LN's residual add, the stream update runs in fp32 under bf16 autocast (only the sublayer runs in
    bf16): with a sublayer that returns 0, the mixed stream is exactly what it is without autocast."""
    site = frac_site(n, 4, dtype=torch.float32)
    with torch.no_grad():
        site.alpha.add_(0.1 * torch.randn_like(site.alpha))
    x = torch.randn(*([n] if n > 1 else []), BATCH, SEQ, WIDTH)
    zero = lambda h: torch.zeros_like(h)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = site(x, zero)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, site(x, zero))


# --- every model, the meta device, the audit, the Amax gain -------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
@pytest.mark.parametrize("options", [{}, {"frac_streams": 2, "frac_fractions": 2, "frac_dynamic": False}])
def test_every_model_trains_a_step(model, options):
    torch.manual_seed(0)
    net = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="frac",
                             residual_options=options)
    idx = torch.randint(0, 65, (2, 8))
    loss = nn.functional.cross_entropy(net(idx).logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    sites = [site for _, _, site in net.residual_sites()]
    assert len(sites) == 8 and all(site.alpha.grad.abs().sum() > 0 for site in sites)


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])  # deepseek's MoE counts tokens: no meta forward at all
def test_meta_device_and_the_audit(model):
    with torch.device("meta"):
        net = reslab.build_model(model, layers=2, residual="frac", residual_options={"frac_streams": 2})
        assert net(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, net.config.vocab_size)
    result = audit(net, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [] and result.not_run == []
    assert [(r.owner, r.kind) for r in result.residuals] == [
        (f"blocks.{i}.{s}_residual", "multi-stream") for i in range(2) for s in ("attn", "ffn")]


def test_amax_gain_is_one_at_init_and_grows_with_the_mixes():
    torch.manual_seed(0)
    net = reslab.build_model("gpt", residual="frac", residual_options={"frac_streams": 2}, **SMALL)
    idx = torch.randint(0, 11, (2, 16))
    metrics = probed_metrics(net, idx)
    assert (metrics["amax_gain_forward"], metrics["amax_gain_backward"]) == (1.0, 1.0)
    with torch.no_grad():
        for _, _, site in net.residual_sites():
            site.alpha[..., 1:] *= 1.5  # every skip path scaled by 1.5 per site, 4 sites
    metrics = probed_metrics(net, idx)
    assert metrics["amax_gain_forward"] == pytest.approx(1.5 ** 4, rel=1e-4)


def probed_metrics(model, idx):
    with StreamProbe().attached(model):
        model(idx)
    sites = [site for _, _, site in model.residual_sites()]
    return type(sites[0]).scheme_metrics(sites)


# --- options and the CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"frac_fractions": 1}, "frac_fractions must be an integer >= 2 (one fraction is hyper-connections"),
    ({"frac_streams": 0}, "frac_streams must be a positive integer"),
    ({"frac_dynamic": "yes"}, "frac_dynamic must be true or false"),
    ({"frac_fractions": 3}, "frac_fractions=3 must divide the width 32"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(reslab.ReslabError, match=re.escape(message)) as error:
        reslab.build_model("gpt", residual="frac", residual_options=options, **SMALL)
    assert "\n" not in str(error.value)


def test_connections_across_depth_compose_with_one_stream_only():
    net = reslab.build_model("gpt", residual="frac+x0", **SMALL)
    assert torch.isfinite(net(torch.randint(0, 11, (2, 16))).logits).all()
    with pytest.raises(reslab.ReslabError, match="compose with one stream only; set frac_streams=1"):
        reslab.build_model("gpt", residual="frac+x0", residual_options={"frac_streams": 2}, **SMALL)


TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--steps", "3", "--eval-batches", "1", "--no-progress", "--residual", "frac"]


@pytest.mark.parametrize("sets", [[], ["--set", "frac_streams=2", "--set", "frac_dynamic=false"]])
def test_train_three_steps_through_the_cli(cli, corpus, tmp_path, sets):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, *sets, "--data", corpus, "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)
    options = json.loads((run / "config.json").read_text())["model_config"]["residual_options"]
    assert options == ({"frac_streams": 2, "frac_dynamic": False} if sets else {})


def test_bad_option_on_the_cli_exits_2_with_one_line(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--set", "frac_fractions=1", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "frac_fractions" in err
