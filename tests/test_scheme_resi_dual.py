"""ResiDual (`--residual resi-dual`): parity with the reference layers (microsoft/ResiDual @8682f75
`resi_dual/resi_dual_layers.py`, vendored unmodified in tests/reference_code/resi_dual/ and run on stand-ins for
its two fairseq base classes) through `reslab.interop.convert_resi_dual`, after one site, after several and at the
output, values and gradients in fp64 and fp32, on toy sites and on a whole gpt; the formula on a plain stream; every
transformer forward and backward, also on the meta device; the dual stream's RMS metric; the audit's reading; the
converter's and the options' one-line refusals; three training steps and a bad option through the CLI."""

import importlib.util
import json
import math
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.errors import ReslabError
from reslab.graph import audit
from reslab.interop.convert_resi_dual import load_resi_dual, load_resi_dual_layer, load_resi_dual_output
from reslab.nn import make_norm
from reslab.residual import SiteSpec, get_scheme
from reslab.residual.resi_dual import DualOutput, DualStream, ResiDual

REFERENCE = Path(__file__).parent / "reference_code" / "resi_dual"
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}  # the demand
WIDTH, HEADS, LAYERS = 16, 2, 3
ALPHA, SCALE = 0.7, 0.5  # not the defaults (1, 1): both must reach the output the reference's way
OPTIONS = {"resi_dual_alpha": ALPHA, "resi_dual_scale": SCALE}
SMALL = {"width": 32, "heads": 2, "layers": 4, "vocab_size": 65}


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def reference():
    """(the vendored layers module, the fairseq stand-ins): the stand-ins sit in `sys.modules` only while the
    vendored file imports them, then `sys.modules` is as it was."""
    standin = load_file("resi_dual_fairseq_standin", REFERENCE / "fairseq_standin.py")
    saved = {name: sys.modules.get(name) for name in standin.modules()}
    sys.modules.update(standin.modules())
    try:
        layers = load_file("resi_dual_reference_layers", REFERENCE / "resi_dual_layers.py")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return layers, standin


def config(width: int = WIDTH, alpha: float = ALPHA, scale: float = SCALE):
    return reference()[1].StandInConfig(embed_dim=width, ffn_embed_dim=2 * width, attention_heads=HEADS,
                                        enc_alpha=alpha, dec_alpha=alpha, enc_res_input_norm_scale=scale,
                                        dec_res_input_norm_scale=scale)


def randomise_norms(module: nn.Module) -> None:
    """Gains around 1 and non-zero biases in every LayerNorm, so a norm copied to the wrong place shows."""
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
                norm.bias.copy_(0.3 * torch.randn_like(norm.bias))


def reference_layers(kind: str, dtype: torch.dtype, cfg=None) -> tuple[list[nn.Module], nn.LayerNorm]:
    """`LAYERS` reference layers (decoder: no cross-attention) and the output norm of `res`, LayerNorm(eps=1e-7) as
    the reference's decoder builds it (`resi_dual/resi_dual.py:157`), all with random weights."""
    module, _ = reference()
    cfg = cfg or config()
    torch.manual_seed(0)
    if kind == "decoder":
        layers = [module.ResiDualDecoderLayer(cfg, no_encoder_attn=True) for _ in range(LAYERS)]
    else:
        layers = [module.ResiDualEncoderLayer(cfg) for _ in range(LAYERS)]
    output_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-7)
    for part in (*layers, output_norm):
        randomise_norms(part)
        part.to(dtype).eval()
    return layers, output_norm


def causal_mask(kind: str, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """fairseq's decoder mask (`buffered_future_mask`: -inf above the diagonal); the encoder layer takes ones there
    and fills them itself (`resi_dual_layers.py:21-24`)."""
    upper = torch.ones(seq, seq, dtype=dtype).triu(1)
    return upper.masked_fill(upper.bool(), float("-inf")) if kind == "decoder" else upper


class Sublayer(nn.Module):
    """One of a reference layer's two sublayers as a reslab sublayer, (batch, seq, width) in and out, computed as
    the reference's forward computes it (`resi_dual_layers.py:116-134, 166-175`), the encoder's mask filled as the
    encoder layer fills it."""

    def __init__(self, layer: nn.Module, part: str, mask: torch.Tensor, kind: str):
        super().__init__()
        self.layer, self.part = layer, part
        fill = -1e8 if mask.dtype == torch.float32 else -1e4
        self.mask = mask if kind == "decoder" else mask.masked_fill(mask.bool(), fill)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t, layer = h.transpose(0, 1), self.layer
        if self.part == "attn":
            out = layer.self_attn(query=t, key=t, value=t, attn_mask=self.mask)[0]
        else:
            out = layer.fc2(layer.activation_dropout_module(layer.activation_fn(layer.fc1(t))))
        return layer.dropout_module(out).transpose(0, 1)


def run_reference(kind: str, layers, x0: torch.Tensor, mask: torch.Tensor, output_norm=None):
    """The reference's stack around its layers (`resi_dual/resi_dual.py:107-131` encoder, `:252-283` decoder):
    `res = x * scale`, each layer on `(x, res)`, then `x * alpha + layer_norm(res)`. (batch, seq, width) in; the
    streams after each layer and the output out, batch first again."""
    cfg, x = layers[0].cfg, x0.transpose(0, 1)
    res = x * (cfg.dec_res_input_norm_scale if kind == "decoder" else cfg.enc_res_input_norm_scale)
    after = []
    for layer in layers:
        if kind == "decoder":
            (x, res), _, _ = layer((x, res), None, None, None, self_attn_mask=mask)
        else:
            x, res = layer((x, res), encoder_padding_mask=None, attn_mask=mask)
        after.append((x.transpose(0, 1), res.transpose(0, 1)))
    if output_norm is None:
        return after, None
    alpha = cfg.dec_alpha if kind == "decoder" else cfg.enc_alpha
    return after, (x * alpha + output_norm(res)).transpose(0, 1)


def reslab_sites(dtype: torch.dtype, layers: int = LAYERS, **options) -> list[ResiDual]:
    scheme = get_scheme("resi-dual")
    return [scheme(SiteSpec(layer, index, layers, WIDTH, make_norm("layernorm"), {**OPTIONS, **options})).to(dtype)
            for layer in range(layers) for index in (0, 1)]


def max_error(ours, theirs) -> float:
    """max |a - b| / (1 + |b|) over every entry: absolute and relative at once (torch.testing's atol = rtol)."""
    return max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(ours, theirs, strict=True))


def record(name: str, error: float) -> None:
    print(f"{name}: max |reslab - reference| / (1 + |reference|) = {error:.3g}")  # the figures, with -s


def gradients(output: torch.Tensor, weights: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad((output * weights).sum(), inputs))


def norm_parameters(norms: list[nn.Module]) -> list[torch.Tensor]:
    return [p for norm in norms for p in (norm.weight, norm.bias)]


# --- parity on toy sites: the reference layers' own sublayers -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_parity_after_several_sites_and_at_the_output(kind, dtype):
    layers, output_norm = reference_layers(kind, dtype)
    sites = reslab_sites(dtype)
    adapter = get_scheme("resi-dual").stream_adapter(WIDTH, LAYERS, OPTIONS).to(dtype)
    for layer, (attn_site, ffn_site) in zip(layers, zip(sites[::2], sites[1::2], strict=True), strict=True):
        load_resi_dual_layer(attn_site, ffn_site, layer)
    load_resi_dual_output(adapter, output_norm, ALPHA)

    x0 = torch.randn(2, 5, WIDTH, dtype=dtype, requires_grad=True)
    mask = causal_mask(kind, 5, dtype)
    theirs, their_y = run_reference(kind, layers, x0, mask, output_norm)
    stream, ours = adapter.widen(x0), []
    for site, layer, part in zip(sites, [l for l in layers for _ in (0, 1)], ["attn", "ffn"] * LAYERS, strict=True):
        stream = site(stream, Sublayer(layer, part, mask, kind))
        if part == "ffn":
            ours.append(stream)
    our_y = adapter.reduce(stream)
    assert isinstance(stream, DualStream)
    error = max_error([t for pair in ours for t in pair] + [our_y], [t for pair in theirs for t in pair] + [their_y])
    record(f"{kind} {dtype} forward, streams after sites 2, 4, 6 and the output", error)
    assert error <= TOL[dtype]

    shared = [p for layer in layers for p in (*layer.self_attn.parameters(), *layer.fc1.parameters(),
                                              *layer.fc2.parameters())]
    theirs_in = [x0, *norm_parameters([n for l in layers for n in (l.self_attn_layer_norm, l.final_layer_norm)]),
                 *norm_parameters([output_norm]), *shared]
    ours_in = [x0, *norm_parameters([site.norm for site in sites]), *norm_parameters([adapter.norm]), *shared]
    weights = torch.randn_like(our_y)
    error = max_error(gradients(our_y, weights, ours_in), gradients(their_y, weights, theirs_in))
    record(f"{kind} {dtype} backward, input, every norm and sublayer weight", error)
    assert error <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_after_one_site(dtype):
    """The stream after one site, from the reference's own code: a layer whose FFN writes zero (fc2 zeroed) and
    whose second norm is the identity returns exactly `(x, res)` after its attention sublayer."""
    (layer, *_), _ = reference_layers("decoder", dtype)
    attn_site, ffn_site = reslab_sites(dtype, layers=1)
    load_resi_dual_layer(attn_site, ffn_site, layer)
    with torch.no_grad():
        layer.fc2.weight.zero_()
        layer.fc2.bias.zero_()
    layer.final_layer_norm = nn.Identity()
    adapter = get_scheme("resi-dual").stream_adapter(WIDTH, 1, OPTIONS).to(dtype)

    x0 = torch.randn(2, 5, WIDTH, dtype=dtype, requires_grad=True)
    mask = causal_mask("decoder", 5, dtype)
    [(their_x, their_d)], _ = run_reference("decoder", [layer], x0, mask)
    our_x, our_d = attn_site(adapter.widen(x0), Sublayer(layer, "attn", mask, "decoder"))
    error = max_error([our_x, our_d], [their_x, their_d])
    record(f"one site {dtype} forward", error)
    assert error <= TOL[dtype]
    assert not torch.equal(our_x, x0) and not torch.equal(our_d, SCALE * x0)  # the site did write

    shared = list(layer.self_attn.parameters())
    theirs_in = [x0, *norm_parameters([layer.self_attn_layer_norm]), *shared]
    ours_in = [x0, *norm_parameters([attn_site.norm]), *shared]
    wx, wd = torch.randn_like(our_x), torch.randn_like(our_d)
    ours = torch.autograd.grad((our_x * wx).sum() + (our_d * wd).sum(), ours_in)
    theirs = torch.autograd.grad((their_x * wx).sum() + (their_d * wd).sum(), theirs_in)
    error = max_error(ours, theirs)
    record(f"one site {dtype} backward", error)
    assert error <= TOL[dtype]


# --- parity on a whole gpt: reslab's sublayers inside the reference layers ------------------------------------------
class FairseqCall(nn.Module):
    """A reslab attention sublayer behind fairseq's attention call (time-major; reslab's is causal itself)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, query, key, value, **ignored):
        return self.attention(query.transpose(0, 1)).transpose(0, 1), None

    def _get_input_buffer(self, incremental_state):
        return {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_of_a_whole_gpt(dtype):
    """The reference layers run reslab's own attention and MLP; the converter loads their norms and the output norm
    into a gpt built with `--residual resi-dual`, whose logits and gradients must be the reference stack's."""
    model = reslab.build_model("gpt", width=32, heads=2, layers=LAYERS, vocab_size=65, context=16, bias=True,
                               residual="resi-dual", residual_options=OPTIONS).to(dtype).eval()
    cfg = config(width=32)
    layers, output_norm = reference_layers("decoder", dtype, cfg)
    for layer, block in zip(layers, model.blocks, strict=True):
        layer.self_attn, layer.fc1, layer.activation_fn, layer.fc2 = (
            FairseqCall(block.attn), block.ffn.up, block.ffn.act, block.ffn.down)
    load_resi_dual(model, layers, output_norm, cfg)
    assert isinstance(model.norm, nn.Identity)  # final_norm = False: LN(d) is the only output norm

    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = model(idx).logits
    x0 = model.tok_emb(idx) + model.pos_emb(torch.arange(12))
    _, y = run_reference("decoder", layers, x0, causal_mask("decoder", 12, dtype), output_norm)
    theirs = model.head(y)
    error = max_error([ours], [theirs])
    record(f"gpt {dtype} logits", error)
    assert error <= TOL[dtype]

    shared = [p for name, p in model.named_parameters() if "residual" not in name and not name.startswith("stream")]
    ours_in = [*norm_parameters([s for b in model.blocks for s in (b.attn_residual.norm, b.ffn_residual.norm)]),
               *norm_parameters([model.stream.norm]), *shared]
    theirs_in = [*norm_parameters([n for l in layers for n in (l.self_attn_layer_norm, l.final_layer_norm)]),
                 *norm_parameters([output_norm]), *shared]
    weights = torch.randn_like(ours)
    error = max_error(gradients(ours, weights, ours_in), gradients(theirs, weights, theirs_in))
    record(f"gpt {dtype} gradients of every parameter", error)
    assert error <= TOL[dtype]


# --- the formula, every model, the meta device ---------------------------------------------------------------------
def test_a_site_on_a_plain_stream_is_a_one_site_resi_dual():
    """x -> a LN(x + F(x)) + LN_d(s x + s F(x)): the output norm fresh (unit gain, zero bias, eps 1e-7), in x's
    dtype; the post-LN norm the site's own (random here)."""
    torch.manual_seed(1)
    site = reslab_sites(torch.float64, layers=1)[0]
    with torch.no_grad():
        site.norm.weight.copy_(1 + 0.3 * torch.randn(WIDTH))
        site.norm.bias.copy_(0.3 * torch.randn(WIDTH))
    sublayer = nn.Linear(WIDTH, WIDTH).double()
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64)
    fx = sublayer(x)
    post = F.layer_norm(x + fx, (WIDTH,), site.norm.weight, site.norm.bias, 1e-5)
    expected = ALPHA * post + F.layer_norm(SCALE * x + SCALE * fx, (WIDTH,), eps=1e-7)
    got = site(x, sublayer)
    assert got.dtype == torch.float64 and got.shape == x.shape
    assert (got - expected).abs().max().item() < 1e-12  # (torch.testing would import sympy: 4 s)


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_every_transformer_forward_backward(model):
    torch.manual_seed(0)
    net = reslab.build_model(model, **SMALL, residual="resi-dual")
    assert isinstance(net.stream, DualOutput) and isinstance(net.norm, nn.Identity)
    idx = torch.randint(0, 65, (2, 8))
    logits = net(idx).logits
    F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert logits.shape == (2, 8, 65) and torch.isfinite(logits).all()
    sites = [site for _, _, site in net.residual_sites()]
    scheme_parameters = [*(p for site in sites for p in site.parameters()), *net.stream.parameters()]
    assert len(sites) == 8 and len(scheme_parameters) >= 8 + 2  # a post-LN per site, LN(d)'s weight and bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scheme_parameters)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_meta_device(model):
    with torch.device("meta"):
        net = reslab.build_model(model, **SMALL, residual="resi-dual")
    logits = net(torch.zeros(1, 8, dtype=torch.long, device="meta")).logits
    assert logits.device.type == "meta" and logits.shape == (1, 8, 65)
    site = net.blocks[0].attn_residual
    assert site(torch.zeros(1, 8, 32, device="meta"), net.blocks[0].attn).device.type == "meta"


def test_scheme_declarations():
    scheme = get_scheme("resi-dual")
    assert scheme is ResiDual and scheme.streams({}) == 2
    assert not scheme.final_norm and not scheme.additive_stream
    assert scheme.resolve_options({}) == {"resi_dual_alpha": 1.0, "resi_dual_scale": 1.0}


def test_dual_stream_rms_metric():
    """`scheme_metrics`: the RMS of d after each block, from the last probed forward, as the streams carry it."""

    class Probe:
        def record(self, site, x, fx, out):
            pass

    torch.manual_seed(0)
    net = reslab.build_model("gpt", **SMALL, residual="resi-dual")
    sites = [site for _, _, site in net.residual_sites()]
    assert type(sites[0]).scheme_metrics(sites) == {}  # nothing probed yet
    seen = []
    for block in net.blocks:
        block.ffn_residual.register_forward_hook(lambda module, args, out: seen.append(out.d.pow(2).mean().sqrt()))
    for site in sites:
        site.probe = Probe()
    net(torch.randint(0, 65, (2, 8)))
    metric = type(sites[0]).scheme_metrics(sites)["dual_stream_rms"]
    assert metric == pytest.approx([value.item() for value in seen], rel=1e-6) and len(metric) == 4
    assert metric[-1] > metric[0]  # the raw sum of the writes grows with depth


def test_audit_reads_a_post_ln_residual_around_every_sublayer():
    """On gpt. Known gap: the dual stream's adds `d + s F(x)` read as residuals only where d is the sublayer's
    input itself (the first sublayer, d_0 = x_0 with s = 1), since elsewhere d is not what F reads."""
    with torch.device("meta"):
        net = reslab.build_model("gpt", layers=2, residual="resi-dual")
    result = audit(net, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [] and result.not_run == []  # LN(d) and every branch reach the logits
    normalized = [(r.owner, r.wraps) for r in result.residuals if r.kind == "normalized"]
    assert normalized == [(f"blocks.{i}.{s}_residual", (f"blocks.{i}.{s}",)) for i in range(2) for s in ("attn", "ffn")]


# --- refusals ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"resi_dual_alpha": -0.5}, "resi_dual_alpha must be a number in [0, inf]"),
    ({"resi_dual_alpha": "1"}, "resi_dual_alpha must be a number"),
    ({"resi_dual_scale": 0}, "resi_dual_scale must be a number in (0, 1]"),
    ({"resi_dual_scale": 1.5}, "resi_dual_scale must be a number in (0, 1]"),
    ({"resi_dual_scale": True}, "resi_dual_scale must be a number in (0, 1]"),
    ({"resi_dual_gain": 1.0}, "has no option 'resi_dual_gain'"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ReslabError) as error:
        reslab.build_model("gpt", layers=1, residual="resi-dual", residual_options=options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_converter_refuses_what_would_compute_differently():
    module, _ = reference()
    layers, output_norm = reference_layers("decoder", torch.float32)
    attn_site, ffn_site = reslab_sites(torch.float32, layers=1)
    post = get_scheme("post")(SiteSpec(0, 0, 1, WIDTH, make_norm("layernorm")))
    cases = [
        (lambda: load_resi_dual_layer(attn_site, ffn_site, module.ResiDualDecoderLayer(config())), "cross-attention"),
        (lambda: load_resi_dual_layer(*reslab_sites(torch.float32, layers=1, resi_dual_scale=1.0), layers[0]),
         "--set resi_dual_scale=0.5"),
        (lambda: load_resi_dual_output(get_scheme("resi-dual").stream_adapter(WIDTH, 1, {}), output_norm, ALPHA),
         "--set resi_dual_alpha=0.7"),
        (lambda: load_resi_dual_output(get_scheme("resi-dual").stream_adapter(WIDTH, 1, OPTIONS),
                                       nn.LayerNorm(WIDTH), ALPHA), "eps=1e-07"),
        (lambda: load_resi_dual(reslab.build_model("llama", width=WIDTH, heads=2, layers=LAYERS, residual="resi-dual",
                                                   residual_options=OPTIONS), layers, output_norm, config()),
         "reslab's is RMSNorm"),
        (lambda: load_resi_dual(reslab.build_model("gpt", width=WIDTH, heads=2, layers=2, residual="resi-dual",
                                                   residual_options=OPTIONS), layers, output_norm, config()),
         "--layers 3"),
        (lambda: load_resi_dual_layer(post, post, layers[0]), "--residual resi-dual"),
    ]
    for call, message in cases:
        with pytest.raises(ReslabError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


# --- the CLI ---------------------------------------------------------------------------------------------------------
TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--steps", "3", "--eval-batches", "1", "--no-progress", "--residual", "resi-dual"]


def test_train_three_steps(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--set", "resi_dual_scale=0.5", "--log-interval", "1", "--data", corpus,
                       "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    rms = [m["dual_stream_rms"] for m in metrics if "dual_stream_rms" in m]
    assert rms and all(len(r) == 2 and all(math.isfinite(v) and v > 0 for v in r) for r in rms)


def test_bad_option_is_one_line_exit_2(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--set", "resi_dual_scale=2", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "resi_dual_scale" in err, err
