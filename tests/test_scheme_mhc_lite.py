"""mHC-lite (`--residual mhc-lite`): parity with the reference module (FFTYYY/mhc-lite @ea19775 `MHCLite`, vendored
unmodified in tests/reference_code/mhc_lite/), weights copied with `reslab.interop.convert_mhc_lite`, for one site
(streams in the model's layout and a plain stream through both sides' expand/reduce) and for every site of a whole
gpt model, forward and backward, fp64 and fp32; the reference's init; an exactly doubly-stochastic mix; every
transformer, the meta device and the audit; three training steps through the CLI; bad options in one line."""

import contextlib
import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import reslab
from reslab.errors import ReslabError
from reslab.graph import audit
from reslab.interop.convert_mhc_lite import load_mhc_lite_site
from reslab.nn import make_norm
from reslab.registry import TRANSFORMERS
from reslab.residual import SiteSpec, get_scheme

REFERENCE = Path(__file__).parent / "reference_code" / "mhc_lite" / "mhc_lite.py"
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}  # the demand; the figures measured are far below
WIDTH, BATCH, SEQ = 32, 2, 5
CONVERTED = ("norm_gain", "dynamic_proj", "gates", "read_bias", "write_bias", "perm_bias")  # the converter's
SMALL = {"width": WIDTH, "heads": 2, "layers": 4, "vocab_size": 65}


@pytest.fixture(scope="module")
def oracle():
    """The vendored reference, loaded by path as a top-level module (it needs only torch and einops)."""
    spec = importlib.util.spec_from_file_location("mhc_lite_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def reference_permutations(oracle, n: int, dtype: torch.dtype):
    """The reference caches its permutation matrices in float32 per (n, device) (lines 190, 356-360) and einsums them
    with coefficients of the stream's dtype, which torch refuses in float64: put copies in `dtype` in its cache (the
    cache only, not its code) and restore it after."""
    key, saved = (n, "cpu"), oracle.perm_mats.get((n, "cpu"))
    oracle.perm_mats[key] = oracle.get_all_permutations(n).to(dtype)
    try:
        yield
    finally:
        oracle.perm_mats.pop(key)
        if saved is not None:
            oracle.perm_mats[key] = saved


def reference_site(oracle, n: int, layer_index: int, dtype: torch.dtype, seed: int):
    """A reference `MHCLite` with every weight random (biases, scales and the norm gain too, so that all n!
    permutations carry weight and a weight copied to the wrong place shows)."""
    torch.manual_seed(seed)
    reference = oracle.MHCLite(n, dim=WIDTH, layer_index=layer_index).to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return reference


def site(n: int, dtype: torch.dtype = torch.float64, depth_index: int = 1, **options):
    spec = SiteSpec(depth_index // 2, depth_index % 2, 4, WIDTH, make_norm("rmsnorm", eps=1e-6),
                    {"streams": n, **options})
    return get_scheme("mhc-lite")(spec).to(dtype)


def in_site_layout(site_module, reference, gradients) -> dict[str, torch.Tensor]:
    """The reference's parameter gradients arranged as the site's parameters, by the converter itself."""
    carrier, target = copy.deepcopy(reference), copy.deepcopy(site_module)
    with torch.no_grad():
        for p, g in zip(carrier.parameters(), gradients, strict=True):
            p.copy_(g)
    load_mhc_lite_site(target, carrier)
    return {name: getattr(target, name) for name in CONVERTED}


def error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|): absolute for values of order 1, relative for larger ones."""
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1.0)).item()


def record(name: str, value: float) -> None:
    print(f"mhc-lite parity, {name}: {value:.3g}")  # the figures, with -s


def toy_sublayer(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()).to(dtype)


# --- parity: one site -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_site_matches_reference(oracle, n, dtype):
    """Streams (n, batch, seq, width) in; the reference takes them batch-major, ((batch n), seq, width)."""
    ours, sublayer = site(n, dtype, depth_index=n + 1), toy_sublayer(dtype)
    reference = reference_site(oracle, n, n + 1, dtype, seed=n)
    load_mhc_lite_site(ours, reference)
    streams = torch.randn(n, BATCH, SEQ, WIDTH, dtype=dtype, requires_grad=True)
    theirs_in = streams.detach().movedim(0, 1).flatten(0, 1).requires_grad_()
    out = ours(streams, sublayer)
    with reference_permutations(oracle, n, dtype):
        branch_input, add_residual = reference(theirs_in)
        theirs = add_residual(sublayer(ours.norm(branch_input))).unflatten(0, (BATCH, n)).movedim(1, 0)
    forward = error(out, theirs)
    probe = torch.randn_like(out)
    shared = [*sublayer.parameters(), *ours.norm.parameters()]
    grads = torch.autograd.grad(out, [streams, *shared, *(getattr(ours, k) for k in CONVERTED)], probe)
    their_grads = torch.autograd.grad(theirs, [theirs_in, *shared, *reference.parameters()], probe)
    backward = max(error(grads[0], their_grads[0].unflatten(0, (BATCH, n)).movedim(1, 0)),
                   *(error(a, b) for a, b in zip(grads[1:len(shared) + 1], their_grads[1:len(shared) + 1])))
    mapped = in_site_layout(ours, reference, their_grads[len(shared) + 1:])
    backward = max(backward, *(error(g, mapped[k]) for g, k in zip(grads[len(shared) + 1:], CONVERTED)))
    record(f"one site, n={n}, {dtype}: forward {forward:.3g}, backward", backward)
    assert forward <= TOL[dtype] and backward <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_site_on_a_plain_stream_matches_reference_expand_and_reduce(oracle, dtype):
    """Called outside a model on (batch, seq, width): reslab widens and reduces itself; the reference with its own
    `get_expand_reduce_stream_functions` (n copies in, the sum out)."""
    n, sublayer = 4, toy_sublayer(dtype)
    ours, reference = site(n, dtype), reference_site(oracle, n, 1, dtype, seed=7)
    load_mhc_lite_site(ours, reference)
    expand, reduce = oracle.get_expand_reduce_stream_functions(n)
    x = torch.randn(BATCH, SEQ, WIDTH, dtype=dtype)
    with reference_permutations(oracle, n, dtype):
        branch_input, add_residual = reference(expand(x))
        theirs = reduce(add_residual(sublayer(ours.norm(branch_input))))
    assert error(ours(x, sublayer), theirs) <= TOL[dtype]


# --- parity: every site of a model ----------------------------------------------------------------------------------
def reference_forward(model, references, idx, oracle, n):
    """gpt's forward with each site replaced by its reference module (the model's embeddings, sublayers, the site's
    pre-norm, final norm and head): the logits and the streams after every site, in reslab's layout."""
    expand, reduce = oracle.get_expand_reduce_stream_functions(n)
    x = expand(model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1])))
    streams = []
    pairs = [pair for block in model.blocks for pair in block.sites()]
    for (site_module, sublayer), reference in zip(pairs, references, strict=True):
        branch_input, add_residual = reference(x)
        x = add_residual(sublayer(site_module.norm(branch_input)))
        streams.append(x.unflatten(0, (idx.shape[0], n)).movedim(1, 0))
    return model.head(model.norm(reduce(x))), streams


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_of_sites_matches_reference_chain(oracle, dtype):
    """A 2-block gpt (4 sites, 4 streams): the stream after each site, the logits, and the gradient of every model
    parameter (the sites' through the converter) against the same model run through the reference modules."""
    n = 4
    torch.manual_seed(0)
    model = reslab.build_model("gpt", **{**SMALL, "layers": 2}, context=16, residual="mhc-lite").to(dtype)
    sites = [site_module for block in model.blocks for site_module, _ in block.sites()]
    references = [reference_site(oracle, n, k, dtype, seed=10 + k) for k in range(len(sites))]
    for site_module, reference in zip(sites, references, strict=True):
        load_mhc_lite_site(site_module, reference)
    ours_streams = []
    hooks = [s.register_forward_hook(lambda _m, _i, out: ours_streams.append(out)) for s in sites]
    idx = torch.randint(0, 65, (BATCH, 8))
    logits = model(idx).logits
    for hook in hooks:
        hook.remove()
    with reference_permutations(oracle, n, dtype):
        their_logits, their_streams = reference_forward(model, references, idx, oracle, n)
    after_sites = [error(a, b) for a, b in zip(ours_streams, their_streams, strict=True)]
    forward = max(*after_sites, error(logits, their_logits))
    probe = torch.randn_like(logits)
    names = [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] not in CONVERTED]
    shared = [model.get_parameter(name) for name in names]
    grads = torch.autograd.grad(logits, [*shared, *(getattr(s, k) for s in sites for k in CONVERTED)], probe)
    their_grads = torch.autograd.grad(their_logits, [*shared, *(p for r in references for p in r.parameters())],
                                      probe)
    backward = max(error(a, b) for a, b in zip(grads[:len(shared)], their_grads[:len(shared)], strict=True))
    ours_by_site = iter(grads[len(shared):])
    theirs_by_reference = iter(their_grads[len(shared):])
    for site_module, reference in zip(sites, references, strict=True):
        mapped = in_site_layout(site_module, reference,
                                [next(theirs_by_reference) for _ in reference.parameters()])
        backward = max(backward, *(error(next(ours_by_site), mapped[k]) for k in CONVERTED))
    record(f"gpt, 4 sites, {dtype}: after each site {max(after_sites):.3g}, logits {forward:.3g}, backward",
           backward)
    assert len(ours_streams) == 4 and forward <= TOL[dtype] and backward <= TOL[dtype]


# --- the scheme's own promises --------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth_index", [0, 5])
def test_init_is_the_reference_init(oracle, depth_index):
    """A fresh site holds what a fresh reference module does for the same sublayer (W 0, scales 0.01, gamma 0,
    +-1 biases on stream k mod n, b_res 0 / -8). At init the identity has weight w = 1 / (1 + 23 e^-8) = 0.992 and
    each other permutation e^-8 w; (n-1)! = 6 permutations send a stream to a given one, so H_res has
    (1 + 5 e^-8) w on the diagonal and 6 e^-8 w elsewhere."""
    fresh = site(4, depth_index=depth_index)
    loaded = copy.deepcopy(fresh)
    with torch.no_grad():
        for name in CONVERTED:
            getattr(loaded, name).fill_(float("nan"))
    load_mhc_lite_site(loaded, oracle.MHCLite(4, dim=WIDTH, layer_index=depth_index).double())
    for name in CONVERTED:
        assert torch.equal(getattr(fresh, name), getattr(loaded, name)), name
    read, mix, _ = fresh.connection_weights(torch.randn(4, BATCH, SEQ, WIDTH, dtype=torch.float64))
    w, eye = 1 / (1 + 23 * math.exp(-8)), torch.eye(4, dtype=torch.float64)
    assert torch.allclose(mix, (eye * (1 + 5 * math.exp(-8)) + (1 - eye) * 6 * math.exp(-8)) * w)
    expected_read = torch.sigmoid(torch.full((4,), -1.0, dtype=torch.float64))
    expected_read[depth_index % 4] = torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(read, expected_read.expand(BATCH, SEQ, 4))


def test_mix_is_exactly_doubly_stochastic():
    """With random weights H_res is non-negative with rows and columns summing to 1 to rounding (no Sinkhorn
    error), H_pre lies in (0, 1) and H_post in (0, 2); the permutations are the n! distinct ones, identity first."""
    ours = site(4)
    torch.manual_seed(3)
    with torch.no_grad():
        for name in CONVERTED:
            getattr(ours, name).copy_(torch.randn_like(getattr(ours, name)) * 0.5)
    read, mix, write = ours.connection_weights(torch.randn(4, BATCH, SEQ, WIDTH, dtype=torch.float64) * 3)
    ones = torch.ones(BATCH, SEQ, 4, dtype=torch.float64)
    assert (mix >= 0).all() and mix.max() < 0.99  # truly mixed, not one permutation
    assert torch.allclose(mix.sum(-1), ones, atol=1e-14) and torch.allclose(mix.sum(-2), ones, atol=1e-14)
    assert ((read > 0) & (read < 1)).all() and ((write > 0) & (write < 2)).all()
    perms = ours.permutations.view(-1, 4, 4)
    assert perms.shape[0] == 24 and len({tuple(p.flatten().tolist()) for p in perms}) == 24
    assert torch.equal(perms[0], torch.eye(4, dtype=perms.dtype))
    assert torch.equal(perms.sum(-1), torch.ones(24, 4, dtype=perms.dtype))


def test_perm_logit_zero_starts_from_the_uniform_mix():
    """`mhc_lite_perm_logit = 0`: every permutation equally weighted at init, so H_res = J / n."""
    _, mix, _ = site(3, mhc_lite_perm_logit=0.0).connection_weights(
        torch.randn(3, BATCH, SEQ, WIDTH, dtype=torch.float64))
    assert torch.allclose(mix, torch.full_like(mix, 1 / 3))


# --- every transformer, meta, audit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", TRANSFORMERS)
def test_every_transformer_forward_backward(model_name):
    """Forward and backward on the CPU (every site's projection gets a gradient, though it starts at 0), and a
    forward on the meta device."""
    torch.manual_seed(0)
    model = reslab.build_model(model_name, **SMALL, residual="mhc-lite")
    tokens = torch.randint(0, 65, (2, 8))
    logits = model(tokens).logits
    assert logits.shape == (2, 8, 65) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    projections = [m.dynamic_proj for m in model.modules() if getattr(m, "name", "") == "mhc-lite"]
    assert len(projections) == 8 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
    # on meta, deepseek's blocks all dense: its MoE router counts tokens per expert (`bincount`), which meta tensors
    # cannot, whatever the residual scheme (the audit traces such a model on the CPU instead)
    if model_name == "deepseek-v4":  # every V4 block routes: no dense form to run on meta (the audit uses the CPU)
        return
    dense = {"first_k_dense": SMALL["layers"]} if model_name == "deepseek" else {}
    with torch.device("meta"):
        meta = reslab.build_model(model_name, **SMALL, **dense, residual="mhc-lite")
    assert meta(torch.zeros(2, 8, dtype=torch.long, device="meta")).logits.shape == (2, 8, 65)


def test_audit_reads_one_multi_stream_residual_per_sublayer():
    with torch.device("meta"):
        model = reslab.build_model("gpt", **{**SMALL, "layers": 2}, residual="mhc-lite")
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [] and result.not_run == []
    assert [(r.owner, r.kind) for r in result.residuals] == [
        (f"blocks.{i}.{s}_residual", "multi-stream") for i in range(2) for s in ("attn", "ffn")]


# --- options and the converter's refusals ---------------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"streams": 7}, "streams must be at most 6"), ({"streams": 0}, "streams must be a positive integer"),
    ({"mhc_lite_perm_logit": 1.0}, "mhc_lite_perm_logit must be a number in [-50, 0]"),
    ({"mhc_lite_perm_logit": "low"}, "mhc_lite_perm_logit must be a number"),
])
def test_bad_options_are_one_line(options, words):
    with pytest.raises(ReslabError) as caught:
        reslab.build_model("gpt", **SMALL, residual="mhc-lite", residual_options=options)
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_fracs": 2}, "frac-connections"), ({"num_input_views": 2}, "several input views"),
    ({"dropout": 0.1}, "dropout"), ({"num_residual_streams": 3}, "has 3 streams, the site 4"),
])
def test_converter_refuses_what_the_site_does_not_compute(oracle, kwargs, words):
    kwargs = {"num_residual_streams": 4, "dim": WIDTH, **kwargs}
    reference = oracle.MHCLite(kwargs.pop("num_residual_streams"), **kwargs)
    with pytest.raises(ReslabError, match=words):
        load_mhc_lite_site(site(4, torch.float32), reference)


# --- training through the CLI ---------------------------------------------------------------------------------------
TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--steps", "3", "--eval-batches", "1", "--no-progress", "--residual", "mhc-lite"]


def test_train_three_steps_keeps_amax_gain_one(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--streams", "3", "--set", "mhc_lite_perm_logit=-4", "--data", corpus,
                       "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)
    gains = [(m["amax_gain_forward"], m["amax_gain_backward"]) for m in metrics if "amax_gain_forward" in m]
    assert gains and all(abs(g - 1) < 1e-5 for pair in gains for g in pair)  # doubly stochastic: products too


def test_bad_option_through_the_cli_is_one_line_exit_2(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--streams", "7", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "streams must be at most 6" in err
