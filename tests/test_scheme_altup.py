"""AltUp (`--residual altup`, Gemma 3n's alternating updates): parity of predict and correct with transformers'
`Gemma3nTextAltUp` (one block and several, fp64 and fp32, forward and backward) and of the widening and collapse
with `Gemma3nTextModel`, weights copied by `reslab.interop.convert_altup`; the formula with zero coefficients; the
Amax gain; every transformer, also on the meta device; a short CLI training run; bad options in one line."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn
import transformers
from transformers.models.gemma3n import modeling_gemma3n

import reslab
from reslab.interop.convert_altup import load_altup_adapter, load_altup_model, load_altup_site
from reslab.nn import MLP, CausalSelfAttention, make_norm
from reslab.residual import SiteSpec, get_scheme
from reslab.residual.altup import AltUpState

WIDTH, STREAMS, EPS = 32, 4, 1e-6
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def gemma_config(layers: int = 2, clip: float = 120.0):
    config = transformers.Gemma3nTextConfig(
        hidden_size=WIDTH, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, vocab_size=64, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
        num_kv_shared_layers=0, laurel_rank=4, altup_num_inputs=STREAMS, altup_coef_clip=clip,
        layer_types=["full_attention"] * layers, activation_sparsity_pattern=[0.0] * layers, rms_norm_eps=EPS,
        max_position_embeddings=64)
    config._attn_implementation = "eager"
    return config


def sites(layers: int, **options):
    """Each block's (attention site, FFN site), built as a model builds them, on RMSNorm."""
    options = {"altup_streams": STREAMS, **options}
    return [tuple(get_scheme("altup")(SiteSpec(layer, index, layers, WIDTH, make_norm("rmsnorm", eps=EPS), options))
                  for index in (0, 1)) for layer in range(layers)]


@torch.no_grad()
def randomize(*modules: nn.Module, seed: int = 0) -> None:
    """Coefficients large enough that the router, the prediction and the correction all matter; gains off 1."""
    generator = torch.Generator().manual_seed(seed)
    for module in modules:
        for name, p in module.named_parameters():
            scale = 3.0 if "modality_router" in name else 0.4
            p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale + (1.0 if p.dim() == 1 else 0.0))


@pytest.fixture(scope="module")
def blocks():
    """Two blocks' worth: each a `Gemma3nTextAltUp` built alone (the reference) and the attention and MLP both
    sides run (reslab's: Gemma 3n's own compute some norms in fp32, which would blur an fp64 comparison of AltUp),
    random weights."""
    references = [modeling_gemma3n.Gemma3nTextAltUp(gemma_config()) for _ in range(2)]
    randomize(*references)
    torch.manual_seed(0)
    calls = [(CausalSelfAttention(WIDTH, 2), MLP(WIDTH, 64)) for _ in range(2)]
    return references, calls


def reference_run(references, ours, calls, x):
    """Gemma 3n's predict and correct around the same pre-LN block, with our sites' norms: the expected stream
    after every site (the attention site's as `(predictions, the active prediction advanced by attention)`)."""
    expected = []
    for altup, (attn_site, ffn_site), (attn, mlp) in zip(references, ours, calls):
        predictions = altup.predict(x)
        prediction = predictions[0]
        advanced = prediction + attn(attn_site.norm(prediction))
        expected.append((predictions, advanced))
        activated = advanced + mlp(ffn_site.norm(advanced))
        x = altup.correct(predictions, activated)
        expected.append(x)
    return expected


def our_run(ours, calls, x):
    found = []
    for (attn_site, ffn_site), (attn, mlp) in zip(ours, calls):
        state = attn_site(x, attn)
        assert isinstance(state, AltUpState) and state.altup is attn_site.altup
        found.append((state.predictions, state.advanced))
        x = ffn_site(state, mlp)
        found.append(x)
    return found


def flat(values) -> list[torch.Tensor]:
    return [t for v in values for t in (v if isinstance(v, tuple) else (v,))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_blocks", [1, 2])
def test_predict_and_correct_match_gemma3n_altup(blocks, dtype, num_blocks):
    references, calls = blocks
    references = [altup.to(dtype).eval() for altup in references[:num_blocks]]
    calls = [(attn.to(dtype), mlp.to(dtype)) for attn, mlp in calls[:num_blocks]]
    ours = [(a.to(dtype).eval(), f.to(dtype).eval()) for a, f in sites(num_blocks)]
    for layer, ((attn_site, ffn_site), altup) in enumerate(zip(ours, references)):
        load_altup_site(attn_site, altup)
        randomize(attn_site.norm, ffn_site.norm, seed=1 + layer)
    x = torch.randn(STREAMS, 2, 5, WIDTH, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    expected, found = reference_run(references, ours, calls, x), our_run(ours, calls, x)
    tol = TOLERANCE[dtype]
    assert len(found) == 2 * num_blocks
    for want, got in zip(flat(expected), flat(found)):  # after every site: attention's state, then the K streams
        assert (want - got).abs().max().item() <= tol
    # backward: the input streams, the AltUp coefficients (one set per block, both sites use it), norms, sublayers
    weight = torch.randn(found[-1].shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    names = ("router_norm", "modality_router", "prediction_coefs", "correction_coefs")
    reference_params = [getattr(altup, name).weight for altup in references for name in names]
    our_params = [getattr(attn_site.altup, name).weight for attn_site, _ in ours for name in names]
    shared = [p for a, f in ours for p in (a.norm.weight, f.norm.weight)]
    shared += [p for attn, mlp in calls for p in (*attn.parameters(), *mlp.parameters())]
    want = torch.autograd.grad((weight * expected[-1]).sum(), [x, *reference_params, *shared])
    got = torch.autograd.grad((weight * found[-1]).sum(), [x, *our_params, *shared])
    for a, b in zip(want, got):
        assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())
    assert all(g.abs().max().item() > 1e-3 for g in got[:len(our_params) + 1])  # the coefficients matter


def test_training_clip_matches_gemma3n_without_changing_the_weights(blocks):
    """In training the coefficients are clipped: Gemma 3n clamps the prediction weight in place, reslab clamps a
    copy. The same stream and input gradient; our parameters keep their values."""
    _, calls = blocks
    reference = modeling_gemma3n.Gemma3nTextAltUp(gemma_config(clip=0.3)).double().train()
    randomize(reference, seed=4)
    (attn_site, ffn_site), = sites(1, altup_coef_clip=0.3)
    attn_site.double().train(), ffn_site.double().train()
    load_altup_site(attn_site, reference)
    before = attn_site.altup.prediction_coefs.weight.detach().clone()
    assert before.abs().max().item() > 0.3 and attn_site.altup.correction_coefs.weight.abs().max().item() > 0.3
    mlp = calls[0][1].double()
    x = torch.randn(STREAMS, 2, 5, WIDTH, dtype=torch.float64).requires_grad_()
    predictions = reference.predict(x)
    advanced = predictions[0] + mlp(attn_site.norm(predictions[0]))
    want = reference.correct(predictions, advanced + mlp(ffn_site.norm(advanced)))
    got = ffn_site(attn_site(x, mlp), mlp)
    assert reference.prediction_coefs.weight.abs().max().item() == pytest.approx(0.3)  # theirs, clamped in place
    assert torch.equal(attn_site.altup.prediction_coefs.weight, before)  # ours untouched
    assert (want - got).abs().max().item() <= 1e-6
    (grad_want,), (grad_got,) = (torch.autograd.grad(out.square().sum(), [x]) for out in (want, got))
    assert (grad_want - grad_got).abs().max().item() <= 1e-6 * grad_want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_widening_and_collapse_match_gemma3n_text_model(dtype):
    """Gemma3nTextModel's stream widening (what its first layer receives) and collapse (what its final norm
    receives), forward and backward, against reslab's stream adapter with the projections copied."""
    reference = modeling_gemma3n.Gemma3nTextModel(gemma_config()).to(dtype).eval()
    randomize(reference.altup_projections, reference.altup_unembed_projections, seed=5)
    seen = {}

    def keep(name):
        def hook(module, args, *out):  # records the output (forward hook) or the first input; returns None
            seen.setdefault(name, out[0] if out else args[0])
        return hook

    hooks = [reference.embed_tokens.register_forward_hook(keep("embedded")),
             reference.layers[0].register_forward_pre_hook(keep("widened")),
             reference.layers[-1].register_forward_hook(keep("last")),
             reference.norm.register_forward_pre_hook(keep("collapsed"))]
    reference(input_ids=torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6)))
    for hook in hooks:
        hook.remove()
    adapter = get_scheme("altup").stream_adapter(WIDTH, 2, {"altup_streams": STREAMS}).to(dtype)
    load_altup_adapter(adapter, reference)
    widened, collapsed = adapter.widen(seen["embedded"]), adapter.reduce(seen["last"])
    tol = TOLERANCE[dtype]
    assert widened.shape == (STREAMS, 2, 6, WIDTH)
    assert (widened - seen["widened"]).abs().max().item() <= tol
    assert (collapsed - seen["collapsed"]).abs().max().item() <= tol
    for name, out_ref, out_ours, source in (("altup_projections", seen["widened"], widened, "embedded"),
                                            ("altup_unembed_projections", seen["collapsed"], collapsed, "last")):
        weight = torch.randn(out_ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
        want = torch.autograd.grad((weight * out_ref).sum(), [seen[source], *getattr(reference, name).parameters()],
                                   retain_graph=True)
        got = torch.autograd.grad((weight * out_ours).sum(), [seen[source], *getattr(adapter, name).parameters()],
                                  retain_graph=True)
        assert len(got) == STREAMS
        for a, b in zip(want, got):
            assert (a - b).abs().max().item() <= tol * max(1.0, a.abs().max().item())


def test_load_altup_model_copies_every_layer_and_refuses_a_mismatch():
    reference = modeling_gemma3n.Gemma3nTextModel(gemma_config())
    randomize(reference.layers[1].altup, reference.altup_unembed_projections, seed=8)
    model = reslab.build_model("llama", layers=2, width=WIDTH, heads=2, vocab_size=64, norm_eps=EPS,
                               residual="altup", residual_options={"altup_streams": STREAMS})
    load_altup_model(model, reference)
    altup = model.blocks[1].attn_residual.altup
    assert torch.equal(altup.modality_router.weight, reference.layers[1].altup.modality_router.weight)
    assert torch.equal(altup.router_norm.weight, reference.layers[1].altup.router_norm.weight)
    assert torch.equal(model.stream.altup_unembed_projections[2].weight, reference.altup_unembed_projections[2].weight)
    gpt = reslab.build_model("gpt", layers=2, width=WIDTH, heads=2, residual="altup")
    with pytest.raises(reslab.ReslabError, match="router norm is an RMSNorm"):
        load_altup_site(gpt.blocks[0].attn_residual, reference.layers[0].altup)
    with pytest.raises(reslab.ReslabError, match="altup_num_inputs 4, the site 2 streams"):
        load_altup_site(sites(1, altup_streams=2)[0][0], reference.layers[0].altup)
    with pytest.raises(reslab.ReslabError, match="FFN site holds no AltUp weights"):
        load_altup_site(model.blocks[0].ffn_residual, reference.layers[0].altup)


# --- the formula --------------------------------------------------------------------------------------------------
class Affine(nn.Module):
    def forward(self, x):
        return 2 * x + 1


def test_with_zero_coefficients_every_stream_gets_the_active_streams_update():
    """C = 0 (nothing predicted) and c = 1: `X~_i = X_i + (v - X_0)`, v the pre-LN block on X_0."""
    (attn_site, ffn_site), = sites(1)
    nn.init.zeros_(attn_site.altup.modality_router.weight)
    x = torch.randn(STREAMS, 2, 3, WIDTH)
    u = x[0] + 2 * attn_site.norm(x[0]) + 1
    v = u + 2 * ffn_site.norm(u) + 1
    torch.testing.assert_close(ffn_site(attn_site(x, Affine()), Affine()), x + (v - x[0]))


def test_a_site_alone_maps_a_plain_stream_to_a_plain_stream():
    """Outside a model a site wraps AltUp around its own sublayer (K copies in, the mean out); with zero
    coefficients (the FFN site has none of its own) that is pre-LN."""
    (attn_site, ffn_site), = sites(1)
    x = torch.randn(2, 3, WIDTH)
    out = attn_site(x, Affine())
    assert out.shape == x.shape and torch.equal(out, attn_site(x, Affine()))
    assert not torch.allclose(out, x + 2 * attn_site.norm(x) + 1, atol=1e-3)
    torch.testing.assert_close(ffn_site(x, Affine()), x + 2 * ffn_site.norm(x) + 1)
    nn.init.zeros_(attn_site.altup.modality_router.weight)  # m = 0: C = 0 and c = 1
    torch.testing.assert_close(attn_site(x, Affine()), x + 2 * attn_site.norm(x) + 1)


def test_amax_gain_of_the_predictions():
    from reslab.probe import StreamProbe

    model = reslab.build_model("llama", layers=2, width=WIDTH, heads=2, vocab_size=11, residual="altup")
    idx = torch.randint(0, 11, (2, 8))
    all_sites = [site for _, _, site in model.residual_sites()]

    def gains():
        with StreamProbe().attached(model):
            model(idx)
        return type(all_sites[0]).scheme_metrics(all_sites)

    for site in all_sites[::2]:
        nn.init.zeros_(site.altup.prediction_coefs.weight)
    metrics = gains()
    assert (metrics["amax_gain_forward"], metrics["amax_gain_backward"]) == (1.0, 1.0)  # I + C = I
    for site in all_sites[::2]:
        nn.init.normal_(site.altup.prediction_coefs.weight, 0.0, 2.0)
        nn.init.normal_(site.altup.modality_router.weight, 0.0, 20.0)
    assert gains()["amax_gain_forward"] > 1.0


def test_the_audit_reads_altup_as_it_reads_gemma3n():
    """Per block: predict (`X + C X`, an identity skip beside the learned mix), attention and the FFN (pre-LN), and
    the correction (`X^ + c (v - X^_0)`, gated by c, its branch the whole block), as in Gemma 3n's layers less
    their LAuReL and per-layer-input residuals."""
    from reslab.graph import audit

    reference = audit(modeling_gemma3n.Gemma3nTextModel(gemma_config()), (torch.zeros(1, 8, dtype=torch.long),))
    shipped = [r.kind for r in reference.residuals
               if not r.owner.endswith("laurel") and not any("per_layer" in w for w in r.wraps)]
    with torch.device("meta"):
        model = reslab.build_model("llama", layers=2, width=WIDTH, heads=2, residual="altup")
    ours = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),)).residuals
    assert [r.kind for r in ours] == shipped == ["identity", "identity", "identity", "gated"] * 2
    assert [r.owner for r in ours] == [f"blocks.{i}.{site}_residual" for i in range(2)
                                       for site in ("attn", "attn", "ffn", "ffn")]
    assert ours[0].wraps == ("blocks.0.attn_residual.altup.router_norm", "blocks.0.attn_residual.altup.modality_router")
    assert {"blocks.1.attn_residual", "blocks.1.ffn"} <= set(ours[-1].wraps)  # the correction's: the whole block


# --- every transformer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_every_transformer_trains_with_altup(model):
    torch.manual_seed(0)
    net = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="altup")
    assert type(net.stream).__name__ == "AltUpAdapter" and len(net.stream.altup_projections) == STREAMS - 1
    logits = net(torch.randint(0, 65, (2, 16))).logits
    assert logits.shape == (2, 16, 65) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # the widening, the collapse, every block's coefficients and norms all learn
    if model != "deepseek":  # the MoE's expert counts cannot run on meta, whatever the scheme
        with torch.device("meta"):
            meta = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="altup")
        assert meta(torch.zeros(2, 16, dtype=torch.long, device="meta")).logits.shape == (2, 16, 65)


# --- options and the CLI ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"altup_streams": 0}, "altup_streams must be a positive integer, got 0"),
    ({"altup_coef_clip": -1.0}, "altup_coef_clip must be a number in [0, inf] (0: no clipping), got -1.0"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(reslab.ReslabError, match=re.escape(message)):
        reslab.build_model("gpt", layers=1, residual="altup", residual_options=options)


TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--eval-batches", "1", "--no-progress"]


def test_train_three_steps_through_the_cli(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--steps", "3", "--residual", "altup", "--set", "altup_streams=2",
                       "--data", corpus, "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert json.loads((run / "config.json").read_text())["model_config"]["residual_options"] == {"altup_streams": 2}


def test_bad_option_exits_2_with_one_line(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--steps", "1", "--residual", "altup", "--set", "altup_streams=0",
                       "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "altup_streams must be a positive integer" in err
