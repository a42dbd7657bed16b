"""Hyper-connections, mHC, attention residuals and value residuals (issue 6): their defining properties, their
flags, and that each trains as well as pre-LN in a short run."""

import json

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.probe import StreamProbe
from reslab.residual.mhc import SinkhornKnopp
from reslab.residual.multistream import amax_gain

SMALL = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 11}
NEW_SCHEMES = ["hc", "mhc", "attnres", "value-residual"]


def tokens(batch: int = 3, seq: int = 16, vocab: int = 11) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def probed_forward(model, idx):
    """One forward with a stream probe attached, as the trainer runs on a log step; returns the scheme metrics."""
    with StreamProbe().attached(model):
        model(idx)
    sites = [site for _, _, site in model.residual_sites()]
    return type(sites[0]).scheme_metrics(sites)


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_hc_with_one_stream_is_pre_ln_for_the_same_weights(model, dynamic):
    torch.manual_seed(0)
    pre = reslab.build_model(model, residual="pre", **SMALL)
    hc = reslab.build_model(model, residual="hc", residual_options={"streams": 1, "hc_dynamic": dynamic}, **SMALL)
    missing, unexpected = hc.load_state_dict(pre.state_dict(), strict=False)
    assert not unexpected
    assert missing and all("_residual." in name for name in missing)  # only HC's own coefficients
    idx = tokens()
    torch.testing.assert_close(hc(idx).logits, pre(idx).logits, atol=1e-6, rtol=0)


def norm_inputs(model, idx) -> list[torch.Tensor]:
    """What each branch norm reads, in order, and then what the final norm reads."""
    seen = []
    norms = [site.norm for _, _, site in model.residual_sites()] + [model.norm]
    handles = [norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach())) for norm in norms]
    model(idx)
    for handle in handles:
        handle.remove()
    return seen


def test_hc_with_four_streams_starts_as_pre_ln():
    """Static init A_m = e_(k mod n), A_r = I, B = 1: every stream holds pre-LN's stream, so every sublayer reads
    exactly pre-LN's input, and the final norm reads the sum of the n equal streams."""
    torch.manual_seed(0)
    pre = reslab.build_model("gpt", residual="pre", **SMALL)
    hc = reslab.build_model("gpt", residual="hc", **SMALL)
    hc.load_state_dict(pre.state_dict(), strict=False)
    idx = tokens()
    *branches, final = norm_inputs(hc, idx)
    *pre_branches, pre_final = norm_inputs(pre, idx)
    for got, expected in zip(branches, pre_branches, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(final, 4 * pre_final, atol=1e-6, rtol=0)
    assert [site.read.argmax().item() for _, _, site in hc.residual_sites()] == [0, 1, 2, 3]


def test_sinkhorn_gives_doubly_stochastic_matrices_in_log_space():
    torch.manual_seed(0)
    matrices = SinkhornKnopp(20)(torch.eye(4) + 0.5 * torch.randn(6, 5, 4, 4))
    assert matrices.shape == (6, 5, 4, 4) and (matrices >= 0).all()
    torch.testing.assert_close(matrices.sum(-1), torch.ones(6, 5, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(matrices.sum(-2), torch.ones(6, 5, 4), atol=1e-4, rtol=0)
    huge = SinkhornKnopp(20)(1e4 * torch.randn(8, 4, 4))  # exp(1e4) overflows; log space does not
    assert torch.isfinite(huge).all() and (huge >= 0).all()
    torch.testing.assert_close(huge.sum(-2), torch.ones(8, 4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("steps", [0, 5])
def test_mhc_stream_mixes_in_a_model_are_doubly_stochastic(steps):
    torch.manual_seed(0)
    model = reslab.build_model("gpt", residual="mhc", **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens()
    for _ in range(steps):  # move the coefficients away from their init
        F.cross_entropy(model(idx).logits.flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    metrics = probed_forward(model, idx)
    for _, _, site in model.residual_sites():
        mix = site.last_stream_mix
        assert mix.shape == (3, 16, 4, 4) and (mix >= 0).all()
        torch.testing.assert_close(mix.sum(-1), torch.ones(3, 16, 4), atol=1e-4, rtol=0)
        torch.testing.assert_close(mix.sum(-2), torch.ones(3, 16, 4), atol=1e-4, rtol=0)
    assert metrics["amax_gain_forward"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["amax_gain_backward"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("scheme, options", [
    ("hc", {}), ("hc", {"hc_dynamic": True}), ("mhc", {}), ("attnres", {}), ("attnres", {"attnres_block": 1}),
    ("value-residual", {}), ("value-residual", {"value_mix_learned": True}),
])
def test_gradients_reach_every_learned_coefficient(scheme, options):
    torch.manual_seed(0)
    model = reslab.build_model("llama", residual=scheme, residual_options=options, **{**SMALL, "layers": 3})
    with torch.no_grad():  # zero-initialised projections (dynamic HC's W, AttnRes's queries) pass no gradient to
        for name, p in model.named_parameters():  # the gates that scale them until they move: nudge them
            if ("_residual." in name or name.startswith("stream.")) and not p.any():
                p.normal_(0.0, 0.02)
    idx = tokens()
    F.cross_entropy(model(idx).logits.flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("block, sources", [(0, [1, 2, 3, 4, 5, 6]), (1, [1, 2, 2, 3, 3, 4])])
def test_attnres_gives_every_earlier_output_a_non_zero_weight_at_init(block, sources):
    torch.manual_seed(0)
    model = reslab.build_model("gpt", residual="attnres", residual_options={"attnres_block": block},
                               **{**SMALL, "layers": 3})
    weights = probed_forward(model, tokens())["attnres_weights"]
    # the embedding, then each output (full), or each finished block's sum and the open block's (block)
    assert [len(w) for w in weights] == sources
    for site_weights in weights:
        assert site_weights == pytest.approx([1 / len(site_weights)] * len(site_weights))  # zero query: the mean


def test_attnres_at_init_reads_the_mean_of_the_sources():
    """With zero queries the second sublayer reads (v_0 + v_1) / 2: pre-LN's input halved. (Later sublayers drift
    from pre-LN by the norms' eps, which a smaller input feels more.)"""
    torch.manual_seed(0)
    pre = reslab.build_model("llama", residual="pre", **SMALL)
    attnres = reslab.build_model("llama", residual="attnres", **SMALL)
    attnres.load_state_dict(pre.state_dict(), strict=False)
    idx = tokens()
    first, second, *_ = norm_inputs(attnres, idx)
    pre_first, pre_second, *_ = norm_inputs(pre, idx)
    torch.testing.assert_close(first, pre_first, atol=1e-6, rtol=0)
    torch.testing.assert_close(2 * second, pre_second, atol=1e-6, rtol=0)


def test_value_residual_mixes_the_first_layers_values():
    torch.manual_seed(0)
    pre = reslab.build_model("llama", residual="pre", **SMALL)
    own_values = reslab.build_model("llama", residual="value-residual", residual_options={"value_mix": 1.0}, **SMALL)
    halfway = reslab.build_model("llama", residual="value-residual", **SMALL)
    for model in (own_values, halfway):
        model.load_state_dict(pre.state_dict())  # the fixed mix adds no parameter
    idx = tokens()
    torch.testing.assert_close(own_values(idx).logits, pre(idx).logits, atol=1e-6, rtol=0)  # lerp(v_1, v, 1) = v
    assert (halfway(idx).logits - pre(idx).logits).abs().max() > 1e-3
    learned = reslab.build_model("llama", residual="value-residual", residual_options={"value_mix_learned": True},
                                 **{**SMALL, "layers": 3})
    mixes = [(layer, site.mix) for layer, index, site in learned.residual_sites() if index == 0]
    assert mixes[0][1] is None  # the first layer supplies v_1
    assert all(mix.shape == (2,) and torch.all(mix == 0.5) for _, mix in mixes[1:])  # one per key/value head


def test_amax_gain_of_composite_mix():
    identity = torch.eye(3)
    assert amax_gain([identity, identity]) == (1.0, 1.0)
    grow = torch.tensor([[2.0, 0.0], [1.0, -1.0]])  # row sums 2, 2; column sums 3, 1
    assert amax_gain([grow]) == (2.0, 3.0)
    assert amax_gain([grow, grow]) == (4.0, 5.0)  # grow @ grow = [[4, 0], [1, 1]]
    per_token = torch.stack([identity, 2 * identity])  # the gain is the largest over tokens
    assert amax_gain([per_token, identity]) == (2.0, 2.0)


def test_scheme_flags(cli):
    code, out, _ = cli("info", "--model", "gpt", "--residual", "hc", "--hc-dynamic", "--streams", "2", "--layers", "1")
    assert code == 0 and "streams=2, dynamic" in out and "ParallelStreams(streams=2)" in out
    code, out, _ = cli("info", "--residual", "mhc", "--sinkhorn-iters", "5", "--layers", "1")
    assert code == 0 and "sinkhorn_iters=5" in out
    code, out, _ = cli("info", "--residual", "attnres", "--attnres-block", "2", "--layers", "1")
    assert code == 0 and "block 2" in out
    code, out, _ = cli("info", "--residual", "value-residual", "--value-mix", "0.3", "--value-mix-learned", "--layers",
                       "2")
    assert code == 0 and "m=0.3, learned per head" in out
    for bad, message in [
        (["--residual", "hc", "--streams", "0"], "streams must be a positive integer, got 0"),
        (["--residual", "mhc", "--hc-dynamic"], "--hc-dynamic applies only with --residual hc"),
        (["--residual", "pre", "--sinkhorn-iters", "3"], "--sinkhorn-iters applies only with --residual mhc"),
        (["--residual", "value-residual", "--value-mix", "2"], "value_mix must be a number in [0, 1], got 2.0"),
    ]:
        code, _, err = cli("info", *bad)
        assert code == 2 and message in err and err.count("\n") == 1


def test_every_new_scheme_trains_about_as_well_as_pre(cli, corpus, tmp_path):
    """A short run on the tiny model through `reslab train`: each scheme ends within 0.1 nats of pre-LN; hc and
    mhc log the Amax gain on their log steps."""
    losses = {}
    for scheme in ["pre", *NEW_SCHEMES]:
        out = tmp_path / scheme
        code, _, err = cli("train", "--model", "tiny", "--residual", scheme, "--layers", "2", "--width", "32",
                           "--context", "32", "--batch", "16", "--steps", "60", "--lr", "3e-3", "--warmup", "10",
                           "--eval-interval", "60", "--eval-batches", "4", "--log-interval", "30", "--data", corpus,
                           "--out", out, "--no-progress")
        assert code == 0, err
        losses[scheme] = json.loads((out / "summary.json").read_text())["final_val_loss"]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if scheme in ("hc", "mhc"):
            assert all(r["amax_gain_forward"] >= 1.0 - 1e-3 for r in records if "drift" in r)
    assert losses["pre"] < 2.8  # it learned something
    for scheme in NEW_SCHEMES:
        assert losses[scheme] <= losses["pre"] + 0.1, losses


def test_sinkhorn_gradient_matches_autograd_through_the_iterations():
    """The implicit (fixed-point) gradient equals autograd through many log-space normalisations."""
    from reslab.residual.mhc import sinkhorn_log_space

    torch.manual_seed(0)
    logits = (torch.eye(4) + 0.5 * torch.randn(5, 4, 4)).double()
    weights = torch.randn(5, 4, 4, dtype=torch.float64)
    implicit = logits.clone().requires_grad_()
    (SinkhornKnopp(200)(implicit) * weights).sum().backward()
    unrolled = logits.clone().requires_grad_()
    (sinkhorn_log_space(unrolled.permute(1, 2, 0), 200).permute(2, 0, 1) * weights).sum().backward()
    torch.testing.assert_close(implicit.grad, unrolled.grad, atol=1e-8, rtol=0)


class FakeRanks:
    """Stands in for a distributed `World`: its max and mean are told apart by the factor each applies."""

    def max(self, tensor):
        return tensor * 2

    def mean(self, tensor):
        return tensor / 4


@pytest.mark.parametrize("scheme, key, factor", [("hc", "amax_gain_forward", 2.0), ("mhc", "amax_gain_backward", 2.0),
                                                 ("attnres", "attnres_weights", 0.25)])
def test_scheme_metrics_are_reduced_over_ranks(scheme, key, factor):
    """In a distributed run every rank reports its share; the logged figure is the max (gain) or mean (weights)."""
    model = reslab.build_model("gpt", residual=scheme, **SMALL)
    with StreamProbe().attached(model):
        model(tokens())
    sites = [site for _, _, site in model.residual_sites()]
    local = type(sites[0]).scheme_metrics(sites)[key]
    reduced = type(sites[0]).scheme_metrics(sites, FakeRanks())[key]
    if key == "attnres_weights":  # one list per sublayer, of its sources' mean weights
        assert len(reduced) == len(local) == 2 * SMALL["layers"]
        pairs = list(zip(reduced, local, strict=True))
    else:
        pairs = [(reduced, local)]
    for got, value in pairs:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(value) * factor)
