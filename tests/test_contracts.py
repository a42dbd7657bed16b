"""The declared contracts (`reslab.contracts`): typed model outputs with auxiliary losses that training adds and
logs, the protocols a language model and its parts provide (checked when it is built, the first missing member
named), capabilities a scheme needs of a sublayer, and parameter groups declared by the modules rather than guessed
from shapes and names."""

import json
import sys
import types

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.contracts import (
    DECLARATIONS,
    Attention,
    LanguageModel,
    LensModel,
    ModelOutput,
    MoELayer,
    Sublayer,
    ValueMixing,
    is_attention,
    members,
    missing,
    parameter_groups,
    require,
    role,
)
from reslab.errors import ReslabError
from reslab.memory import stream_copies
from reslab.models import MODELS, TRANSFORMERS
from reslab.models.gpt import GPT
from reslab.nn import CausalSelfAttention
from reslab.nn.ffn import SwiGLU
from reslab.nn.moe import MoEFeedForward
from reslab.train.step import build_adamw
from reslab.train.step import TrainStep

SMALL = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 11}


class AuxGPT(GPT):
    """GPT with an auxiliary loss (a stand-in for MoE load balancing): the mean square of the logits."""

    aux_loss_weights = {"logit_l2": 0.5}

    def forward(self, idx):
        out = super().forward(idx)
        return ModelOutput(out.logits, {"logit_l2": out.logits.pow(2).mean()}, {"logit_max": out.logits.max()})


class NoProjection(nn.Module):
    """A sublayer that forgot to say which projection writes into the stream."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return self.linear(x)


class Broken(GPT):
    def __init__(self, config):
        super().__init__(config)
        self.blocks[0].ffn = NoProjection(config.width)


@pytest.fixture
def register(monkeypatch):
    """Register a model class under a name, as a new model file plus one registry line would."""
    def add(name, cls):
        module = types.ModuleType(f"reslab_test_{name}")
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(MODELS, name, f"{module.__name__}:{cls.__name__}")
        monkeypatch.setattr("reslab.models.TRANSFORMERS", (*TRANSFORMERS, name))
    return add


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_language_model_returns_a_model_output(name):
    model = reslab.build_model(name, **SMALL)
    out = model(torch.zeros(2, 5, dtype=torch.long))
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 5, 11)
    assert set(out.aux_losses) == set(getattr(model, "aux_loss_weights", {}))  # MoE models: their balance loss
    assert bool(out.metrics) == bool(out.aux_losses)


def test_train_step_adds_weighted_auxiliary_losses_to_the_gradient():
    torch.manual_seed(0)
    model = AuxGPT(AuxGPT.config_class(**SMALL))
    x, y = torch.randint(0, 11, (4, 16)), torch.randint(0, 11, (4, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they were
    step = TrainStep(model, optimizer, grad_clip=0.0, device=torch.device("cpu"), aux_weights={"logit_l2": 0.5})
    model.zero_grad()
    torch.manual_seed(1)
    logits = model(x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) + 0.5 * logits.pow(2).mean()
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    captured = {}
    optimizer.step = lambda: captured.update({id(p): p.grad.clone() for p in model.parameters()})
    torch.manual_seed(1)
    out = step(x, y)
    for p, grad in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(captured[id(p)], grad)
    assert set(out.aux_losses) == {"logit_l2"} and out.aux_losses["logit_l2"] > 0
    assert out.loss == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())


def test_training_logs_each_auxiliary_loss(cli, corpus, tmp_path, register):
    register("aux-gpt", AuxGPT)
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", "aux-gpt", "--layers", "1", "--width", "32", "--heads", "2", "--context",
                       "16", "--batch", "4", "--steps", "4", "--log-interval", "2", "--eval-batches", "1",
                       "--data", corpus, "--out", run, "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "aux_losses" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["aux_losses"]["logit_l2"] > 0 and "logit_max" in r["model_metrics"] for r in logged)


def test_a_missing_contract_member_is_named_when_the_model_is_built(register):
    register("broken", Broken)
    with pytest.raises(ReslabError, match=r"NoProjection does not provide 'output_projection'"):
        reslab.build_model("broken", **SMALL)


def test_parameter_groups_are_declared_not_guessed():
    model = reslab.build_model("gpt", residual="mhc", **SMALL)
    groups = parameter_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups.decay}
    muon = {names[id(p)] for p in groups.muon}
    site = "blocks.0.attn_residual."
    assert "blocks.0.attn.qkv.weight" in decay and "blocks.0.attn.qkv.weight" in muon
    assert site + "dynamic_proj" in decay  # mHC declares its projection decayed ...
    assert site + "dynamic_proj" not in muon  # ... but it is no hidden matrix for Newton-Schulz
    assert site + "mix_bias" not in decay and not any("norm" in name for name in decay)
    assert "tok_emb.weight" in decay and "tok_emb.weight" not in muon  # embeddings: decayed, not Muon's


def test_a_module_can_take_its_parameter_out_of_muon():
    model = reslab.build_model("llama", **SMALL)
    type(model.blocks[0].ffn).not_for_muon = ("gate_up",)  # a submodule: all of its parameters
    try:
        muon = {id(p) for p in parameter_groups(model).muon}
        assert id(model.blocks[0].ffn.gate_up.weight) not in muon and id(model.blocks[0].ffn.down.weight) in muon
    finally:
        del type(model.blocks[0].ffn).not_for_muon


def test_adamw_groups_follow_the_declarations():
    model = reslab.build_model("gpt", residual="hc", residual_options={"hc_dynamic": True}, **SMALL)
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), torch.device("cpu"))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.blocks[0].attn_residual.dynamic_proj) in decayed
    assert id(model.blocks[0].attn_residual.stream_mix) not in decayed


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_every_model_provides_its_protocols(name):
    model = reslab.build_model(name, **SMALL)
    assert missing(model, LanguageModel) is None and missing(model, LensModel) is None
    for _, sublayer in (pair for block in model.blocks for pair in block.sites()):
        assert missing(sublayer, role(sublayer)) is None
        assert not is_attention(sublayer) or missing(sublayer, ValueMixing) is None


@pytest.mark.parametrize("protocol", [Sublayer, Attention, MoELayer, LanguageModel, LensModel])
def test_the_first_missing_member_of_a_protocol_is_named(protocol):
    for member in members(protocol):
        stand_in = types.SimpleNamespace(**{m: None for m in members(protocol) if m != member})
        assert missing(stand_in, protocol) == member
        with pytest.raises(ReslabError, match=rf"^thing does not provide '{member}' \({protocol.__name__}\)"):
            require(stand_in, protocol, "thing")


class NoValueMix(CausalSelfAttention):
    """Attention without the value-residual hook (`value_mix`), as a model of one's own might be."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.value_mix


def test_a_scheme_that_needs_a_hook_the_attention_lacks_is_refused_at_build(monkeypatch):
    monkeypatch.setattr("reslab.models.gpt.CausalSelfAttention", NoValueMix)
    reslab.build_model("gpt", **SMALL)  # pre-LN needs no hook
    with pytest.raises(ReslabError, match=r"^NoValueMix does not provide 'value_mix' \(ValueMixing\), needed by "
                                          r"residual scheme 'value-residual'"):
        reslab.build_model("gpt", residual="value-residual", **SMALL)


def test_options_that_need_more_blocks_are_refused():
    with pytest.raises(ReslabError, match=r"^--value-mix does not apply to a model of 1 block: .* 2 or more"):
        reslab.build_model("gpt", residual="value-residual", residual_options={"value_mix": 0.3}, **{**SMALL,
                                                                                                     "layers": 1})
    reslab.build_model("gpt", residual="value-residual", **{**SMALL, "layers": 1})  # the scheme itself: pre-LN here
    reslab.build_model("gpt", residual="value-residual", residual_options={"value_mix": 0.3}, **SMALL)


@pytest.mark.parametrize("declaration", DECLARATIONS)
def test_an_unknown_name_in_a_parameter_declaration_is_refused_at_build(monkeypatch, declaration):
    monkeypatch.setattr(SwiGLU, declaration, ("gate_upp",), raising=False)
    with pytest.raises(ReslabError, match=rf"^SwiGLU.{declaration} names 'gate_upp', which it does not have"):
        reslab.build_model("llama", **SMALL)


def test_an_moe_layer_without_update_bias_is_named(monkeypatch):
    monkeypatch.delattr(MoEFeedForward, "update_bias")
    with pytest.raises(ReslabError, match=r"MoEFeedForward does not provide 'update_bias' \(MoELayer\)"):
        reslab.build_model("deepseek", **SMALL)


def test_memory_asks_the_scheme_for_its_streams(monkeypatch):
    configs = ({}, {"residual": "pre"}, {"residual": "hc"}, {"residual": "mhc", "residual_options": {"streams": 3}})
    assert [stream_copies(config) for config in configs] == [1, 1, 4, 3]

    class Sevenfold:
        @classmethod
        def streams(cls, options):
            return 7

    monkeypatch.setattr("reslab.residual.get_scheme", lambda name: Sevenfold)
    assert stream_copies({"residual": "anything"}) == 7
