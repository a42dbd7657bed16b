"""`mhc-v4`: DeepSeek-V4's mHC against the modules transformers 5.25 ships (`DeepseekV4HyperConnection`,
`DeepseekV4DecoderLayer`'s wiring, `DeepseekV4HyperHead`), built from a small config with random weights and loaded
with `reslab.interop.convert_mhc_v4`: one site, two decoder layers (four sites) and the head, forward and backward,
in fp64 and fp32. Then the scheme's own promises (row-stochastic mix, options), every transformer, the meta device,
the audit and a short CLI run."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import reslab
from reslab.graph import audit
from reslab.interop.convert_mhc_v4 import (
    from_reference_streams,
    load_mhc_v4_head,
    load_mhc_v4_layer,
    load_mhc_v4_site,
    to_reference_streams,
)
from reslab.nn import make_norm
from reslab.residual import SiteSpec, get_scheme

WIDTH, N, LAYERS = 32, 4, 2
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


@pytest.fixture(scope="module")
def v4():
    """transformers' deepseek_v4 module and a small config (hc_mult 4, 7 Sinkhorn iterations, eps away from 1e-6)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    config = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=WIDTH, moe_intermediate_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
        head_dim=16, q_lora_rank=16, o_lora_rank=16, o_groups=1, n_routed_experts=4, num_experts_per_tok=2,
        index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8, hc_mult=N, hc_sinkhorn_iters=7,
        hc_eps=1e-5, rms_norm_eps=1e-5)
    return modeling_deepseek_v4, config


class Float64Oracle(TorchFunctionMode):
    """transformers' mHC modules round to fp32 by design (`.float()`, modeling_deepseek_v4.py:962-995, 1010-1014),
    reslab's only below fp64. For an fp64 oracle the fp64 tests lift those casts: `Tensor.float()` of an fp64 tensor
    returns it unchanged. The layers' weighted RMSNorms cast with `.to(torch.float32)` and stay fp32 inside, as
    reslab's RMSNorm does. The fp32 tests run the modules untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


def oracle(dtype):
    return Float64Oracle() if dtype == torch.float64 else contextlib.nullcontext()


def sublayer(seed: int) -> nn.Module:
    """A small nonlinear stand-in for attention or the MoE, shared by both sides."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, 48), nn.Tanh(), nn.Linear(48, WIDTH))


class AttnStub(nn.Module):
    """`self_attn` as the decoder layer calls it: (output, weights)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x, **kwargs):
        return self.f(x), None


class MlpStub(AttnStub):
    def forward(self, x, input_ids=None):
        return self.f(x)


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """V4's modules are built with torch.empty: fill every tensor, biases and gains away from 0 and 1, so a weight
    copied to the wrong place (pre and post swapped, comb not transposed) shows."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith(("fn", "hc_fn")):
            p.normal_(0.0, 0.1)
        elif name.endswith(("scale", "hc_scale", "weight")) and p.dim() == 1:
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif p.dim() == 1:
            p.normal_(0.0, 0.5)


def reference_layers(v4, dtype):
    """Two DeepseekV4DecoderLayers with their attention and MoE swapped for `sublayer`s, random mHC weights."""
    modeling, config = v4
    layers = []
    for i in range(LAYERS):
        layer = modeling.DeepseekV4DecoderLayer(config, i)
        layer.self_attn, layer.mlp = AttnStub(sublayer(10 * i)), MlpStub(sublayer(10 * i + 1))
        randomize(layer, 100 + i)
        layers.append(layer.to(dtype))
    head = modeling.DeepseekV4HyperHead(config)
    randomize(head, 7)
    return layers, head.to(dtype)


def site_spec(layer: int, index: int) -> SiteSpec:
    return SiteSpec(layer, index, LAYERS, WIDTH, make_norm("rmsnorm"), {"mhc_v4_sinkhorn_iters": 7})


def reslab_copy(v4, layers, head, dtype):
    """reslab's sites and head for the reference layers, loaded by the converter."""
    scheme = get_scheme("mhc-v4")
    sites = [scheme(site_spec(i, s)) for i in range(LAYERS) for s in (0, 1)]
    for i, layer in enumerate(layers):
        load_mhc_v4_layer(sites[2 * i], sites[2 * i + 1], layer)
    adapter = scheme.stream_adapter(WIDTH, LAYERS, {"mhc_v4_sinkhorn_iters": 7})
    load_mhc_v4_head(adapter, head)
    return [s.to(dtype) for s in sites], adapter.to(dtype)


def streams(dtype, seed=3):
    """(batch, seq, n, D) streams that differ per stream, so the mix matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, N, WIDTH, generator=g, dtype=dtype).requires_grad_()


def outputs_and_grads(out, inputs, params, seed=4):
    """out, and the gradients of <out, g> for a fixed random g with respect to inputs and params."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * g).sum(), [inputs, *params], retain_graph=True)
    return [out.detach(), *grads]


def hc_params(hc: nn.Module, norm: nn.Module) -> list[torch.Tensor]:
    """A V4 connection's tensors and its pre-norm's gain, or a reslab site's (`hc` the site, `norm` its norm)."""
    return [hc.fn, hc.base, hc.scale, norm.weight]


def layer_params(layer: nn.Module) -> list[torch.Tensor]:
    return hc_params(layer.attn_hc, layer.input_layernorm) + hc_params(layer.ffn_hc, layer.post_attention_layernorm)


def head_params(head: nn.Module) -> list[torch.Tensor]:
    return [head.hc_fn, head.hc_base, head.hc_scale]


def worst(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_site_matches_v4_hyper_connection(v4, dtype):
    """V4's attn_hc, input_layernorm and the wiring of modeling_deepseek_v4.py:1188-1191:
    H' = post (x) F(norm(collapsed)) + comb^T H."""
    layers, head = reference_layers(v4, dtype)
    layer = layers[0]
    sites, _ = reslab_copy(v4, layers, head, dtype)
    h = streams(dtype)
    with oracle(dtype):
        post, comb, collapsed = layer.attn_hc(h)
        attn = layer.self_attn(layer.input_layernorm(collapsed))[0]
        theirs = post.to(dtype).unsqueeze(-1) * attn.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ h
    reference = outputs_and_grads(theirs, h, hc_params(layer.attn_hc, layer.input_layernorm))
    mine = to_reference_streams(sites[0](from_reference_streams(h), layer.self_attn.f))
    ours = outputs_and_grads(mine, h, hc_params(sites[0], sites[0].norm))
    assert worst(ours, reference) <= TOLERANCE[dtype]
    assert (mine - h).abs().max() > 0.1  # the site changed the streams: the comparison is not vacuous


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_four_sites_and_the_head_match_v4_layers(v4, dtype):
    """Two V4 decoder layers (their own forward, four sites), then DeepseekV4HyperHead, against reslab's four sites
    and its stream adapter's reduce: the streams after the sites, the collapsed output, and every gradient."""
    layers, head = reference_layers(v4, dtype)
    sites, adapter = reslab_copy(v4, layers, head, dtype)
    h = streams(dtype)
    theirs = h
    with oracle(dtype):
        for layer in layers:
            theirs = layer(theirs)
        collapsed = head(theirs)
    reference = outputs_and_grads(theirs, h, [p for layer in layers for p in layer_params(layer)])
    mine = from_reference_streams(h)
    for i, site in enumerate(sites):
        mine = site(mine, layers[i // 2].self_attn.f if i % 2 == 0 else layers[i // 2].mlp.f)
    ours = outputs_and_grads(to_reference_streams(mine), h, [p for s in sites for p in hc_params(s, s.norm)])
    assert worst(ours, reference) <= TOLERANCE[dtype]

    reference = outputs_and_grads(collapsed, h, head_params(head))
    ours = outputs_and_grads(adapter.reduce(mine), h, head_params(adapter))
    assert worst(ours, reference) <= TOLERANCE[dtype]


def test_converter_refuses_what_would_disagree(v4):
    layers, head = reference_layers(v4, torch.float32)
    site = get_scheme("mhc-v4")(site_spec(0, 0))
    with pytest.raises(reslab.ReslabError, match="7 Sinkhorn iterations, this site 3; build it with "
                                                 "mhc_v4_sinkhorn_iters=7"):
        load_mhc_v4_site(get_scheme("mhc-v4")(SiteSpec(0, 0, 2, WIDTH, make_norm("rmsnorm"),
                                                       {"mhc_v4_sinkhorn_iters": 3})), layers[0].attn_hc)
    with pytest.raises(reslab.ReslabError, match="fn has shape"):
        load_mhc_v4_site(get_scheme("mhc-v4")(SiteSpec(0, 0, 2, WIDTH, make_norm("rmsnorm"),
                                                       {"mhc_v4_streams": 2, "mhc_v4_sinkhorn_iters": 7})),
                         layers[0].attn_hc)
    with pytest.raises(reslab.ReslabError, match="pre-norm is an RMSNorm"):
        load_mhc_v4_site(get_scheme("mhc-v4")(SiteSpec(0, 0, 2, WIDTH, make_norm("layernorm"),
                                                       {"mhc_v4_sinkhorn_iters": 7})),
                         layers[0].attn_hc, layers[0].input_layernorm)
    with pytest.raises(reslab.ReslabError, match="stream adapter, not ParallelStreams"):
        load_mhc_v4_head(get_scheme("mhc").stream_adapter(WIDTH, 2, {}), head)
    load_mhc_v4_site(site, layers[0].attn_hc)
    assert site.hc_eps == 1e-5 and site.rms_eps == 1e-5  # the config's eps travel with the weights


# --- the scheme's own promises ------------------------------------------------------------------------------------
class Probe:
    def record(self, site, x, fx, out):
        pass


def test_stream_mix_rows_sum_to_one_and_the_forward_gain_is_one():
    """V4 ends Sinkhorn on comb's columns, so the stream mix comb^T has rows summing to 1 (up to eps): every output
    stream a convex combination of the inputs, the composite's forward Amax gain 1 (the backward only near it)."""
    torch.manual_seed(0)
    model = reslab.build_model("gpt", layers=2, width=WIDTH, heads=2, vocab_size=65, residual="mhc-v4",
                               residual_options={"mhc_v4_streams": 3, "mhc_v4_sinkhorn_iters": 1})
    sites = [site for _, _, site in model.residual_sites()]
    for site in sites:
        site.probe = Probe()
        with torch.no_grad():
            site.scale.fill_(5.0)  # logits away from 0: a mix far from uniform
    model(torch.randint(0, 65, (2, 8)))
    mix = sites[0].last_stream_mix
    assert mix.shape == (2, 8, 3, 3) and (mix >= 0).all()
    torch.testing.assert_close(mix.sum(-1), torch.ones(2, 8, 3), atol=1e-4, rtol=0)
    assert (mix.sum(-2) - 1).abs().max() > 1e-2  # 1 iteration: the columns are not yet stochastic
    metrics = type(sites[0]).scheme_metrics(sites)
    assert metrics["amax_gain_forward"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["amax_gain_backward"] > 1.0
    head = model.stream
    assert type(head).__name__ == "DeepSeekV4HyperHead" and head.hc_fn.shape == (3, 3 * WIDTH)
    assert {n for n, _ in model.named_parameters() if n.startswith("stream.")} == {
        "stream.hc_fn", "stream.hc_base", "stream.hc_scale"}
    assert get_scheme("mhc-v4").streams({"mhc_v4_streams": 3}) == 3


def test_a_site_alone_widens_and_sums_and_is_deterministic():
    site = get_scheme("mhc-v4")(site_spec(0, 0))
    x = torch.randn(2, 3, WIDTH)
    f = sublayer(0)
    out = site(x, f)
    assert out.shape == x.shape and torch.equal(out, site(x, f))
    h = x.unsqueeze(0).expand(N, *x.shape).contiguous()
    torch.testing.assert_close(out, site(h, f).sum(0))


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_every_transformer_trains_and_runs_on_meta(model):
    torch.manual_seed(0)
    net = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="mhc-v4")
    idx = torch.randint(0, 65, (2, 8))
    loss = F.cross_entropy(net(idx).logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    if model == "deepseek":  # reslab's MoE counts experts with bincount, which has no meta kernel (any scheme)
        return
    with torch.device("meta"):
        meta = reslab.build_model(model, width=32, heads=2, layers=2, vocab_size=65, residual="mhc-v4")
    assert meta(torch.zeros(1, 8, dtype=torch.long, device="meta")).logits.shape == (1, 8, 65)


def test_the_audit_reads_one_multi_stream_residual_per_sublayer():
    with torch.device("meta"):
        model = reslab.build_model("gpt", layers=2, residual="mhc-v4")
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [] and result.not_run == []
    assert [(r.owner, r.kind) for r in result.residuals] == [
        (f"blocks.{i}.{s}_residual", "multi-stream") for i in range(2) for s in ("attn", "ffn")]


# --- the CLI ------------------------------------------------------------------------------------------------------
TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--steps", "3", "--eval-batches", "1", "--no-progress", "--residual", "mhc-v4"]


def test_trains_three_steps_through_the_cli(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--set", "mhc_v4_streams=2", "--data", corpus, "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)


def test_bad_option_is_one_line_exit_2(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--set", "mhc_v4_sinkhorn_iters=0", "--data", corpus, "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "mhc_v4_sinkhorn_iters must be a positive integer, got 0" in err
