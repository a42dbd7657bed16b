"""MUDD (multiway dynamic dense connections, `reslab/residual/depth/mudd.py`): the generator and the mix against the
reference code (Caiyun-AI/MUDDFormer, vendored under tests/reference_code/muddformer), the wiring in a model (which
sources, which streams go where, the next block's separate Q/K/V inputs), pre-LN at init, attention's key and
value inputs, the reported coefficients, every transformer's forward and backward, and the refusals."""

import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reslab
from reslab.errors import ReslabError
from reslab.nn import CausalSelfAttention
from reslab.nn.mla import MultiHeadLatentAttention
from reslab.residual.depth.base import DepthStream, block_output

SMALL = {"width": 32, "heads": 2, "layers": 4, "vocab_size": 65, "context": 16}
REFERENCE = Path(__file__).parent / "reference_code" / "muddformer"


def build(model: str, residual: str = "mudd", seed: int = 0, **config):
    torch.manual_seed(seed)
    return reslab.build_model(model, **{**SMALL, **config, "residual": residual})


def tokens(seed: int = 1, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 65, (2, seq), generator=torch.Generator().manual_seed(seed))


def generators(model) -> list:
    """Block i's MUDD part at its last site, which holds the generator of the streams after block i."""
    return [block.ffn_residual.connections["mudd"] for block in model.blocks]


def randomise(model, seed: int = 3) -> None:
    """W2 and the static biases away from their init, so the dynamic weights and every source take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in generators(model):
            part.w2.copy_(torch.randn(part.w2.shape, generator=g) * 0.5)
            part.bias.copy_(torch.randn(part.bias.shape, generator=g))


# --- the reference oracle -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref():
    """The vendored modeling_muddformer.py, loaded as is, with stand-ins for the two transformers base classes it
    imports (PROVENANCE.md: importing transformers takes longer than this whole file; neither class is exercised)."""
    class AnyConfig:
        def __init__(self, **kwargs):
            pass

    stand_ins = {"transformers": types.ModuleType("transformers"),
                 "transformers.modeling_utils": types.SimpleNamespace(PreTrainedModel=nn.Module),
                 "transformers.configuration_utils": types.SimpleNamespace(PretrainedConfig=AnyConfig)}
    modules = {}
    with mock.patch.dict(sys.modules, stand_ins):
        for name in ("configuration_muddformer", "modeling_muddformer"):
            spec = importlib.util.spec_from_file_location(name, REFERENCE / f"{name}.py")
            modules[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    return types.SimpleNamespace(**modules)


def reference_block(ref, layer: int, layers: int, width: int, part, dtype):
    """The reference generator after block `layer`, with reslab's weights copied in (`expand_last`, no round64:
    reslab's default hidden width). reslab's `mudd_streams` r is the reference's one-stream `dense_type` "l"."""
    dense_type = "qkvr" if part.options["mudd_streams"] == "qkvr" else "l"
    config = ref.configuration_muddformer.MUDDFormerConfig(dim=width, n_layer=layers, n_head=2, vocab_size=65,
                                                           dense_type=dense_type, expand_last=True, round64=False)
    block = ref.modeling_muddformer.MultiwayDynamicDenseBlock(config, layer, last_layer=layer == layers - 1).to(dtype)
    assert (block.w1.weight.shape, block.w2.weight.shape) == (part.w1.shape, part.w2.shape)
    with torch.no_grad():
        block.w1.weight.copy_(part.w1)
        block.w2.weight.copy_(part.w2)
    return block


def reference_mix(block, bias: torch.Tensor, sources: list[torch.Tensor]) -> list[torch.Tensor]:
    """modeling_muddformer.py:181-187: dw = dynamic_dense[i](x) + dense_bs[i][:, None, None, :]; layer_mix."""
    dw = block(sources[-1]) + bias[:, None, None, :]
    return list(block.layer_mix(sources, dw))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("streams", ["qkvr", "r"])
def test_generator_and_mix_match_the_reference(ref, dtype, tol, streams):
    """Every block's streams and all their gradients (sources, W1, W2, biases) equal the reference's."""
    model = build("llama", layers=3, residual_options={"mudd_streams": streams}).to(dtype)
    randomise(model)
    g = torch.Generator().manual_seed(5)
    for layer, part in enumerate(generators(model)):
        block = reference_block(ref, layer, 3, 32, part, dtype)
        bias = part.bias.detach().clone().requires_grad_(True)
        sources = [torch.randn(2, 5, 32, generator=g, dtype=dtype).requires_grad_(True) for _ in range(layer + 2)]
        ours, theirs = part.mix(sources), reference_mix(block, bias, sources)
        assert len(ours) == len(theirs) == (len(streams) if layer < 2 else 1)
        probes = [torch.randn(o.shape, generator=g, dtype=dtype) for o in ours]
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())
        inputs = [*sources, part.w1, part.w2, part.bias]
        grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(ours, probes)), inputs)
        expected = torch.autograd.grad(sum((o * p).sum() for o, p in zip(theirs, probes)),
                                       [*sources, block.w1.weight, block.w2.weight, bias])
        for a, b in zip(grads, expected):
            assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_default_hidden_width_is_the_references_without_round64():
    """C L_i after block i, x4 after the last (expand_last); `mudd_hidden` sets every generator's."""
    shapes = [(p.w1.shape, p.w2.shape, p.bias.shape) for p in generators(build("gpt"))]
    assert shapes == [((8, 32), (8, 8), (4, 2)), ((12, 32), (12, 12), (4, 3)), ((16, 32), (16, 16), (4, 4)),
                      ((20, 32), (5, 20), (1, 5))]
    fixed = generators(build("gpt", residual_options={"mudd_streams": "r", "mudd_hidden": 6}))
    assert [tuple(p.w1.shape) + tuple(p.w2.shape) for p in fixed] == [(6, 32, 2, 6), (6, 32, 3, 6), (6, 32, 4, 6),
                                                                       (6, 32, 5, 6)]
    w1 = torch.cat([p.w1.flatten() for p in fixed])
    assert abs(w1.std().item() * math.sqrt(32) - 1) < 0.15  # normal, std 1/sqrt(D) (llama2.py:107-109)
    assert not torch.equal(fixed[0].w1, fixed[1].w1)  # each block draws its own


# --- the wiring in a model ----------------------------------------------------------------------------------------
def block_outputs(model, idx):
    """The DepthStream each block returns (forward hooks): its x and saved activations."""
    found = []
    handles = [block.register_forward_hook(lambda m, i, out: found.append(out)) for block in model.blocks]
    logits = model(idx).logits
    for handle in handles:
        handle.remove()
    return logits, found


@pytest.mark.parametrize("model_name", ["llama", "deepseek"])
def test_model_wiring_matches_the_reference_formula(ref, model_name):
    """In a model (fp64, randomised generators): after block i the four streams are the reference's mix of the
    embedding and the raw outputs 0..i, the raw output of block i+1 is `h = R + Attn(N(Q), N(K), N(V))`,
    `h + FFN(N(h))`, and the head reads the last (C = 1) mix."""
    model = build(model_name, layers=3).double()
    randomise(model)
    idx = tokens(seq=8)
    logits, outs = block_outputs(model, idx)
    assert torch.equal(outs[-1].x0, model.tok_emb(idx))  # X_0: the embedding
    raw = [outs[-1].x0] + [outs[-1].saved[block_output(i)] for i in range(3)]
    for i, (out, part) in enumerate(zip(outs, generators(model))):
        expected = reference_mix(reference_block(ref, i, 3, 32, part, torch.float64), part.bias, raw[:i + 2])
        got = [out.saved[f"mudd:{c}"] for c in "qkv"] + [out.x] if i < 2 else [out.x]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if i < 2:
            block = model.blocks[i + 1]
            attn_site, ffn_site = block.attn_residual, block.ffn_residual
            q, k, v, r = got
            separate = attn_site.connections["mudd"]
            h = r + block.attn(attn_site.norm(q), key_input=separate.norm_k(k), value_input=separate.norm_v(v))
            torch.testing.assert_close(raw[i + 2], h + block.ffn(ffn_site.norm(h)), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, model.head(model.norm(outs[-1].x)), rtol=0, atol=1e-12)
    assert not torch.allclose(outs[-1].x, raw[-1])  # the last mix is not the identity here


@pytest.mark.parametrize("model_name", ["tiny", "gpt", "llama", "deepseek"])
@pytest.mark.parametrize("streams", ["r", "qkvr"])
def test_mudd_at_init_is_pre_ln_for_the_same_seed(model_name, streams):
    """W2 = 0 and one-hot biases: every stream is the current block's output, and the model draws exactly pre-LN's
    weights (W1 comes from a private generator). r is pre-LN bit for bit; qkvr projects q, k, v with three
    matmuls on the fused matrix's row slices, equal to rounding."""
    idx = tokens()
    pre = build(model_name, "pre")
    mudd = build(model_name, residual_options={"mudd_streams": streams})
    shared = pre.state_dict()
    assert all(torch.equal(value, mudd.state_dict()[key]) for key, value in shared.items())
    reference, logits = pre(idx).logits, mudd(idx).logits
    if streams == "r":
        assert torch.equal(logits, reference)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)


# --- attention with key and value inputs --------------------------------------------------------------------------
def test_attention_takes_key_and_value_inputs():
    """q from x, k from key_input, v from value_input, with the fused matrix's rows and bias (GQA, RoPE, QK-norm);
    the same inputs given explicitly reproduce the one-input path."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, kv_heads=2, bias=True, rope_theta=10000.0, qk_norm=True)
    nn.init.normal_(attn.qkv.bias)
    x, a, b = (torch.randn(2, 6, 32) for _ in range(3))
    wq, wk, wv = attn.qkv.weight.split(attn.split_sizes)
    bq, bk, bv = attn.qkv.bias.split(attn.split_sizes)

    def heads(t, n):
        return t.view(2, 6, n, 8).transpose(1, 2)

    q, k = attn.q_norm(heads(x @ wq.T + bq, 4)), attn.k_norm(heads(a @ wk.T + bk, 2))
    v = heads(b @ wv.T + bv, 2).repeat_interleave(2, dim=1)
    y = F.scaled_dot_product_attention(attn.rope(q), attn.rope(k).repeat_interleave(2, dim=1), v, is_causal=True)
    expected = attn.out(y.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(attn(x, key_input=a, value_input=b), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(attn(x, key_input=x, value_input=x), attn(x), rtol=0, atol=1e-6)
    assert not torch.allclose(attn(x, value_input=b), attn(x, key_input=b), atol=1e-3)


def test_mla_takes_key_and_value_inputs():
    """MLA: the keys (their latent and k_rope) from key_input, the values (their latent) from value_input."""
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=8)
    x, a, b = (torch.randn(2, 6, 32) for _ in range(3))
    q = mla.q_up(mla.q_norm(mla.q_down(x))).view(2, 6, 2, 12).transpose(1, 2)
    down_a, down_b = mla.kv_down(a), mla.kv_down(b)
    kv_a = mla.kv_up(mla.kv_norm(down_a[..., :16])).view(2, 6, 2, 16).transpose(1, 2)
    kv_b = mla.kv_up(mla.kv_norm(down_b[..., :16])).view(2, 6, 2, 16).transpose(1, 2)
    k_rope = mla.rope(down_a[..., 16:].view(2, 1, 6, 4)).expand(2, 2, 6, 4)
    q = torch.cat([q[..., :8], mla.rope(q[..., 8:])], dim=-1)
    k = torch.cat([kv_a[..., :8], k_rope], dim=-1)
    y = F.scaled_dot_product_attention(q, k, kv_b[..., 8:], is_causal=True, scale=12 ** -0.5)
    expected = mla.out(y.transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(mla(x, key_input=a, value_input=b), expected, rtol=0, atol=1e-5)
    assert torch.equal(mla(x, key_input=x, value_input=x), mla(x))


# --- every model, the coefficients, the refusals ------------------------------------------------------------------
@pytest.mark.parametrize("model_name, residual, streams", [
    ("tiny", "mudd", "qkvr"), ("gpt", "mudd", "qkvr"), ("llama", "mudd", "qkvr"), ("deepseek", "mudd", "qkvr"),
    ("tiny", "mudd", "r"), ("deepseek", "mudd", "r"), ("gpt", "pre+x0+mudd", "qkvr"),
])
def test_every_transformer_runs_forward_and_backward(model_name, residual, streams):
    model = build(model_name, residual, residual_options={"mudd_streams": streams})
    idx = tokens()
    loss = F.cross_entropy(model(idx).logits.flatten(0, 1), idx.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in generators(model):  # at init only W1's gradient is zero (W2 = 0 cuts it off)
        assert part.w2.grad.abs().sum() > 0 and part.bias.grad.abs().sum() > 0
    separate = [b.attn_residual.connections["mudd"].norm_k for b in model.blocks[1:]]
    assert all((norm is not None) == (streams == "qkvr") for norm in separate)


def test_coefficients_report_the_static_biases_and_the_mean_weights():
    model = build("gpt", layers=3)
    sites = [site for _, _, site in model.residual_sites()]
    metrics = type(sites[0]).scheme_metrics(sites)["depth_coefficients"]["mudd"]
    assert metrics == {f"static_{c}": [[0.0, 1.0], [0.0, 0.0, 1.0]] for c in "qkv"} | {
        "static_r": [[0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]}  # before any forward: no means
    randomise(model)
    idx = tokens()
    _, outs = block_outputs(model, idx)
    metrics = type(sites[0]).scheme_metrics(sites)["depth_coefficients"]["mudd"]
    part = generators(model)[1]
    raw = outs[1].saved[block_output(1)]
    expected = part.weights(raw).mean(dim=(0, 1))  # (C, L_1): the whole weight, dynamic part included
    for row, c in enumerate("qkvr"):
        torch.testing.assert_close(torch.tensor(metrics[f"mean_{c}"][1]), expected[row].detach(), rtol=0, atol=1e-6)
        assert metrics[f"static_{c}"][1] == pytest.approx(part.bias[row].tolist())
    assert len(metrics["mean_r"]) == 3 and len(metrics["mean_q"]) == 2


def test_a_generator_site_called_alone_needs_the_earlier_outputs():
    site = reslab.residual.get_scheme("mudd")(generators(build("gpt"))[2].spec)
    x = torch.randn(2, 4, 32)
    with pytest.raises(ReslabError, match="needs 'blocks.0:out'"):
        site(DepthStream(x, x, None, {}), nn.Identity())


@pytest.mark.parametrize("options, message", [
    ({"mudd_streams": "qkv"}, "mudd_streams must be 'qkvr'"),
    ({"mudd_hidden": -1}, "mudd_hidden must be an integer >= 0"),
    ({"mudd_hidden": True}, "mudd_hidden must be an integer >= 0"),
    ({"mudd_gates": 1}, "has no option 'mudd_gates'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ReslabError, match=message) as error:
        build("gpt", residual_options=options)
    assert "\n" not in str(error.value)


def test_attention_without_key_value_inputs_is_refused_under_qkvr(monkeypatch):
    monkeypatch.setattr(CausalSelfAttention, "takes_kv_inputs", False)
    with pytest.raises(ReslabError, match="does not take key and value inputs.*mudd_streams=r"):
        build("gpt")
    assert build("gpt", residual_options={"mudd_streams": "r"})(tokens()).logits.shape == (2, 16, 65)


TINY = ["--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1", "--no-progress",
        "--layers", "3", "--steps", "3"]


def test_train_through_the_cli_logs_the_coefficients(cli, corpus, tmp_path):
    code, _, err = cli("train", "--model", "llama", *TINY, "--residual", "mudd", "--data", corpus, "--out",
                       tmp_path / "run")
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    logged = next(m["depth_coefficients"]["mudd"] for m in metrics if "depth_coefficients" in m)
    assert [len(row) for row in logged["static_r"]] == [2, 3, 4] and logged["static_r"][0] != [0.0, 1.0]


@pytest.mark.parametrize("flags, message", [
    (["--residual", "mudd", "--set", "mudd_streams=qk"], "mudd_streams"),
    (["--residual", "mudd", "--set", "mudd_hidden=-3"], "mudd_hidden"),
    (["--residual", "pre+scales+mudd"], "both replace"),
    (["--residual", "post+mudd"], "composes only with 'pre'"),
])
def test_cli_refuses_bad_choices_in_one_line(cli, corpus, tmp_path, flags, message):
    code, _, err = cli("train", "--model", "gpt", *TINY, *flags, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
