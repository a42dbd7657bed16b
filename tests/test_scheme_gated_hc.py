"""gated-hc (Qwen4-Exp's gated-residual hyper-connections): parity with transformers' `Qwen4ExpTextGatedResidual`
(built alone from a small Qwen4ExpTextConfig with random weights, copied in by `reslab.interop.convert_gated_hc`)
after one site and after several sites and the final mixer, forward and backward; the scheme on every transformer,
on the meta device, in the audit and through the CLI; its options and the converter's refusals."""

import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.graph import audit
from reslab.interop.convert_gated_hc import load_gated_hc_mixer, load_gated_hc_site
from reslab.nn import make_norm
from reslab.residual import SiteSpec, get_scheme

WIDTH, STREAMS, RANK = 32, 4, 8
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
SCHEME = get_scheme("gated-hc")
OPTIONS = {"gated_hc_streams": STREAMS, "gated_hc_rank": RANK}


@pytest.fixture(scope="module")
def qwen4_exp():
    """transformers' module and a small text config (4 streams of width 32, rank 8)."""
    from transformers import Qwen4ExpTextConfig
    from transformers.models.qwen4_exp import modeling_qwen4_exp

    config = Qwen4ExpTextConfig(hidden_size=WIDTH, hc_count=STREAMS, hc_lowrank=RANK, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    return modeling_qwen4_exp, config


def reference(modeling, config, dtype, use_combine=True):
    """A shipped gated residual with random weights everywhere (norm gains too), so a misplaced copy shows."""
    module = modeling.Qwen4ExpTextGatedResidual(config, use_combine=use_combine).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def sublayer(dtype):
    return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Tanh(), nn.Linear(2 * WIDTH, WIDTH)).to(dtype)


def site(depth: int, dtype, layers: int = 2, **options):
    spec = SiteSpec(depth // 2, depth % 2, layers, WIDTH, make_norm("rmsnorm"), {**OPTIONS, **options})
    return SCHEME(spec).to(dtype)


def pairs(ours, theirs):
    """(our parameter, the shipped one) for a site or the stream adapter and its reference."""
    read = ours.read if hasattr(ours, "read") else ours.mixer
    found = [(read.norm.weight, theirs.hc_norm.weight), (read.mix_down, theirs.input_mix_weight_down.weight),
             (read.mix_up, theirs.input_mix_weight_up.weight)]
    if read.inject is not None:
        found.append((read.inject, theirs.block_inject_weight.weight))
    return found


def shipped_update(module, flat, f):
    """The decoder layer's update (modeling_qwen4_exp.py 1409-1428): `h_k + b_k F(m)` on the flat (B, S, n D)."""
    mixed, hyper_input, weights = module(flat)
    return hyper_input + (f(mixed).unsqueeze(-2) * weights.unsqueeze(-1)).flatten(-2)


def flat(streams):
    """reslab's (n, batch, seq, D) streams as Qwen4-Exp's (batch, seq, n D)."""
    return streams.movedim(0, -2).flatten(-2)


def max_diff(ours, theirs) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def run_both(modeling, config, dtype, sites: int):
    """`sites` shipped modules and gated-hc sites with the same weights and sublayers, then (for several sites)
    both mixers: the stream after every site, the output, and the gradients of the input and every parameter."""
    torch.manual_seed(0)
    refs = [reference(modeling, config, dtype) for _ in range(sites)]
    ours = [load_gated_hc_site(site(i, dtype), r) for i, r in enumerate(refs)]
    subs = [sublayer(dtype) for _ in range(sites)]
    mixer, adapter = None, SCHEME.stream_adapter(WIDTH, 2, OPTIONS).to(dtype)
    if sites > 1:
        mixer = reference(modeling, config, dtype, use_combine=False)
        load_gated_hc_mixer(adapter, mixer)
    x = torch.randn(2, 5, WIDTH, dtype=dtype)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs, stream = [], x_theirs.repeat(1, 1, STREAMS)  # the model's tiling (modeling_qwen4_exp.py 1584)
    for module, f in zip(refs, subs):
        stream = shipped_update(module, stream, f)
        theirs.append(stream)
    mine, streams = [], adapter.widen(x_ours)
    for s, f in zip(ours, subs):
        streams = s(streams, f)
        mine.append(flat(streams))
    out_theirs = mixer(stream) if mixer is not None else stream
    out_ours = adapter.reduce(streams) if mixer is not None else mine[-1]
    params = [p for o, r in zip(ours, refs) for p in pairs(o, r)] + (pairs(adapter, mixer) if mixer else [])
    grad = torch.randn_like(out_theirs)
    grads_theirs = torch.autograd.grad(out_theirs, [x_theirs] + [t for _, t in params], grad)
    grads_ours = torch.autograd.grad(out_ours, [x_ours] + [o for o, _ in params], grad)
    return (mine + [out_ours], theirs + [out_theirs]), (grads_ours, grads_theirs)


# --- parity with the shipping code --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sites", [1, 4])
def test_matches_qwen4_exp_gated_residual(qwen4_exp, dtype, sites):
    """One site, and four (two decoder layers) then the model's mixer: every stream, the output, and the gradients
    of the input and of every copied parameter agree to 1e-6 (fp64) / 1e-5 (fp32)."""
    (ours, theirs), (grads_ours, grads_theirs) = run_both(*qwen4_exp, dtype, sites)
    assert len(ours) == sites + 1 and ours[0].shape == (2, 5, STREAMS * WIDTH)
    assert max_diff(ours, theirs) <= TOL[dtype]
    assert max_diff(grads_ours, grads_theirs) <= TOL[dtype]
    assert all(g.abs().max() > 0 for g in grads_ours)  # every copied parameter matters to the output


def test_matches_exactly_with_the_reference_norm_in_fp64(qwen4_exp, monkeypatch):
    """transformers computes its grouped norm in fp32 even for fp64 input (`x.float()`), which is all that
    separates the two in fp64: with that norm kept in fp64 they agree to 1e-12."""
    modeling, config = qwen4_exp
    monkeypatch.setattr(modeling.Qwen4ExpTextRMSNorm, "forward",
                        lambda self, x: self._norm(x) * (1.0 + self.weight))
    (ours, theirs), (grads_ours, grads_theirs) = run_both(modeling, config, torch.float64, 4)
    assert max_diff(ours, theirs) <= 1e-12 and max_diff(grads_ours, grads_theirs) <= 1e-12


def test_converter_refuses_a_mismatch_in_one_line(qwen4_exp):
    modeling, config = qwen4_exp
    fp32 = torch.float32
    combining, mixer = reference(modeling, config, fp32), reference(modeling, config, fp32, False)
    cases = [(lambda: load_gated_hc_site(site(0, fp32, gated_hc_streams=2), combining), "gated_hc_streams=4 at"),
             (lambda: load_gated_hc_site(site(0, fp32, gated_hc_rank=4), combining), "gated_hc_rank=8"),
             (lambda: load_gated_hc_site(site(0, fp32), mixer), "lacks block_inject_weight"),
             (lambda: load_gated_hc_mixer(SCHEME.stream_adapter(WIDTH, 2, OPTIONS), combining), "has block_inject"),
             (lambda: load_gated_hc_site(site(0, fp32), nn.Linear(2, 2)), "not a Qwen4-Exp gated residual"),
             (lambda: load_gated_hc_site(nn.Linear(2, 2), combining), "takes a gated-hc site")]
    for call, message in cases:
        with pytest.raises(reslab.ReslabError, match=re.escape(message)) as caught:
            call()
        assert "\n" not in str(caught.value)


# --- the scheme in reslab's models --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_every_transformer_trains_and_runs_on_meta(model):
    torch.manual_seed(0)
    net = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="gated-hc")
    assert isinstance(net.norm, nn.Identity) and net.stream.mixer.inject is None  # the mixer is the final norm
    idx = torch.randint(0, 65, (2, 16))
    loss = F.cross_entropy(net(idx).logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.device("meta"):
        meta = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, residual="gated-hc")
        if model != "deepseek":  # its MoE routing counts tokens (bincount), which meta cannot, under any scheme
            assert meta(torch.zeros(1, 8, dtype=torch.long)).logits.shape == (1, 8, 65)


def test_a_lone_site_on_a_plain_stream_is_the_mean_of_its_streams():
    """Outside a model: x -> mean_k (x + b_k F(h)); with a sublayer that writes nothing, exactly x."""
    torch.manual_seed(0)
    s, f, x = site(0, torch.float64), sublayer(torch.float64), torch.randn(2, 3, WIDTH, dtype=torch.float64)
    widened = x.unsqueeze(0).expand(STREAMS, *x.shape)
    torch.testing.assert_close(s(x, f), s(widened, f).mean(0))
    torch.testing.assert_close(s(x, lambda h: h * 0.0), x)


def test_init_starts_near_pre_ln_and_rank_defaults_to_qwen_ratio():
    """Gate projections N(0, 0.02^2) and zero norm offsets: read gates near 1/2, injection weights near 1."""
    torch.manual_seed(0)
    s = SCHEME(SiteSpec(0, 0, 2, 64, make_norm("rmsnorm"), {}))
    assert s.num_streams == 4 and s.rank == 10  # 320 / 2048 of the width
    assert SCHEME.streams({"gated_hc_streams": 3}) == 3
    _, weights, gate = s.read(torch.randn(2, 3, 4, 64))
    assert (weights - 1).abs().max() < 0.3 and (gate - 0.5).abs().max() < 0.1
    assert s.read.norm.weight.abs().max() == 0 and 0.015 < s.read.mix_down.std() < 0.025


@pytest.mark.parametrize("options, message", [
    ({"gated_hc_streams": 1}, "gated_hc_streams must be an integer >= 2"),
    ({"gated_hc_rank": -1}, "gated_hc_rank must be an integer >= 0"),
    ({"gated_hc_rank": 2.5}, "gated_hc_rank must be an integer >= 0"),
    ({"streams": 2}, "has no option 'streams'"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(reslab.ReslabError, match=re.escape(message)):
        reslab.build_model("gpt", layers=1, residual="gated-hc", residual_options=options)


def test_audit_reads_one_gated_residual_per_sublayer():
    """As it reads hf:qwen4_exp_text: per sublayer one `gated` residual wrapping the connection, then the sublayer."""
    with torch.device("meta"):
        model = reslab.build_model("gpt", layers=2, width=32, heads=2, residual="gated-hc")
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.dead == [] and result.not_run == []
    assert [(r.owner, r.kind) for r in result.residuals] == [
        (f"blocks.{i}.{s}_residual", "gated") for i in range(2) for s in ("attn", "ffn")]
    assert [r.wraps for r in result.residuals][:2] == [("blocks.0.attn_residual.read", "blocks.0.attn"),
                                                        ("blocks.0.ffn_residual.read", "blocks.0.ffn")]


# --- through the CLI ----------------------------------------------------------------------------------------------
TINY = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
        "--steps", "3", "--eval-batches", "1", "--no-progress", "--residual", "gated-hc"]


def test_train_three_steps_logs_amax_gain_one(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TINY, "--set", "gated_hc_rank=4", "--data", corpus, "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    gains = [(m["amax_gain_forward"], m["amax_gain_backward"]) for m in metrics if "amax_gain_forward" in m]
    assert gains and set(gains) == {(1.0, 1.0)}  # identity residuals: no stream mix to grow the signal


def test_bad_option_exits_2_in_one_line(cli, corpus, tmp_path):
    code, _, err = cli("train", *TINY, "--set", "gated_hc_streams=1", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gated_hc_streams" in err
