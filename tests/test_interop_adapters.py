"""The interop registry's contract, through the public interface: every registered family round-trips
reslab -> HF -> reslab with the same logits, unknown HF types are one line listing the supported ones, and an
adapter registered from outside (here, in the test) is used without any change to the generic code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.errors import ReslabError
from reslab.interop import (
    ADAPTERS,
    HFAdapter,
    Refusal,
    Weight,
    config_from_hf,
    convert_state_dict,
    from_hf,
    supported_types,
    to_hf_config,
    to_hf_state_dict,
)
from reslab.interop.gpt2 import GPT2

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SIZES = dict(vocab_size=101, context=32, width=64, layers=2, heads=4)
# Tiny reslab configs per registered adapter, spelled out in full so that the config must round-trip too.
CASES = {
    "gpt2": [dict(bias=True, tie_embeddings=True), dict(bias=True, activation="relu2", tie_embeddings=False)],
    "llama": [dict(kv_heads=2, head_dim=16, ffn_hidden=96),
              dict(kv_heads=1, head_dim=32, ffn_hidden=96, qk_norm=True, tie_embeddings=True),
              dict(kv_heads=2, head_dim=16, ffn_hidden=48, moe_experts=4, moe_top_k=2),  # Mixtral
              dict(kv_heads=2, head_dim=16, ffn_hidden=48, moe_experts=4, moe_top_k=2, qk_norm=True,
                   moe_norm_top_k=False)],  # Qwen3-MoE
    "deepseek": [dict(first_k_dense=1, moe_experts=8, moe_top_k=2, routed_scale=2.5, expert_groups=4, top_groups=2),
                 dict(q_lora_rank=None, rope_interleave=False, first_k_dense=0, moe_experts=4, moe_top_k=1,
                      moe_shared=2, norm_top_k=False, tie_embeddings=True)],
    # a window shorter than the 16 tokens compared, hash and top-k layers, the clamp inside the activations' range
    "deepseek-v4": [dict(head_dim=16, q_lora_rank=32, rope_dim=8, out_groups=2, out_rank=16, window=5, moe_experts=4,
                         moe_top_k=2, moe_hidden=32, hash_layers=1, swiglu_limit=0.05,
                         residual_options={"mhc_v4_streams": 4, "mhc_v4_sinkhorn_iters": 20}),
                    dict(head_dim=32, q_lora_rank=16, rope_dim=32, out_groups=4, out_rank=8, window=64, moe_experts=3,
                         moe_top_k=1, moe_hidden=16, hash_layers=0, router_scoring="sigmoid", routed_scale=2.5,
                         tie_embeddings=True, residual_options={"mhc_v4_streams": 2, "mhc_v4_sinkhorn_iters": 5})],
}


def random_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A reslab model whose every parameter, norm gains and biases included, is drawn at random."""
    torch.manual_seed(seed)
    model = reslab.build_model(name, **SIZES, **overrides)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.1 * torch.randn(param.shape) + (1.0 if param.ndim == 1 else 0.0))
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    idx = torch.randint(0, SIZES["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def hf_from_reslab(model: nn.Module) -> nn.Module:
    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(model), attn_implementation="eager")
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    return hf.float().eval()


@pytest.mark.parametrize("key, case", [(key, case) for key in ADAPTERS for case in CASES.get(key, [None])])
def test_every_adapter_round_trips_reslab_hf_reslab(key, case):
    assert case is not None, f"adapter {key!r} has no tiny config in CASES"
    adapter = ADAPTERS[key]
    ours = random_model(adapter.reslab_model, **case)
    hf = hf_from_reslab(ours)
    assert hf.config.model_type in adapter.hf_types
    back = from_hf(hf)
    assert back.config == ours.config
    expected = logits(ours)
    assert expected.std() > 0.1, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(logits(hf), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=ATOL)


def test_supported_types_come_from_the_registry():
    assert supported_types() == [t for adapter in ADAPTERS.values() for t in adapter.hf_types]
    assert {"gpt2", "llama", "mistral", "qwen3"} <= set(supported_types())


def test_unknown_model_type_is_one_line_listing_the_supported_types():
    with pytest.raises(ReslabError, match="model type 'bert' is not supported") as caught:
        config_from_hf(transformers.BertConfig())
    message = str(caught.value)
    assert "\n" not in message
    assert all(hf_type in message for hf_type in supported_types())


# --- adapters registered from outside -----------------------------------------------------------------------------

class ToyGPT2(GPT2):
    """An existing family under a new HF model type."""

    hf_types = ("toy-gpt2",)


def test_registered_adapter_for_a_new_type_is_used(monkeypatch):
    hf = hf_from_reslab(random_model("gpt", bias=True))
    hf.config.model_type = "toy-gpt2"
    with pytest.raises(ReslabError, match="'toy-gpt2' is not supported"):
        from_hf(hf)
    monkeypatch.setitem(ADAPTERS, "toy-gpt2", ToyGPT2())
    assert "toy-gpt2" in supported_types()
    torch.testing.assert_close(logits(from_hf(hf)), logits(hf), rtol=0, atol=ATOL)
    with pytest.raises(ReslabError, match="toy-gpt2"):  # the listing of supported types follows the registry
        config_from_hf(transformers.BertConfig())


class FakeTiny(HFAdapter):
    """A whole new family, with no transformers class behind it: reslab's `tiny` under made-up HF names."""

    reslab_model = "tiny"
    hf_types = ("fake-tiny",)
    hf_prefix = "fake."
    hf_layer = "layer_{i}."
    residual = "post"
    refused = (Refusal("rotary", False, "the fake has learned positions only"),)
    FIELDS = ("vocab_size", "context", "width", "layers", "heads")

    def overrides(self, hf_config):
        return {field: getattr(hf_config, field) for field in self.FIELDS}

    def hf_config(self, config, transformers):
        return SimpleNamespace(model_type="fake-tiny", **{field: getattr(config, field) for field in self.FIELDS})

    def outer_weights(self, config):
        return (Weight("tok_emb.weight", ("tokens",)), Weight("pos_emb.weight", ("positions",)),
                Weight("head.bias", ("lm_head.bias",)))

    def block_weights(self, config):
        return tuple(Weight(f"{module}.{kind}", (f"{module.replace('.', '_')}_{kind}",))
                     for module in ("attn.qkv", "attn.out", "ffn.up", "ffn.down", "attn_residual.norm",
                                    "ffn_residual.norm") for kind in ("weight", "bias"))


def test_registered_new_family_converts_both_ways(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "fake-tiny", FakeTiny())
    ours = random_model("tiny")
    hf_config, hf_tensors = to_hf_config(ours), to_hf_state_dict(ours)
    assert "fake.layer_1.attn_qkv_weight" in hf_tensors and "lm_head.weight" in hf_tensors
    name, overrides = config_from_hf(hf_config)
    back = reslab.build_model(name, **overrides)
    back.load_state_dict(convert_state_dict(name, overrides, hf_tensors), strict=True)
    torch.testing.assert_close(logits(back.eval()), logits(ours), rtol=0, atol=0)
    with pytest.raises(ReslabError, match="fake-tiny rotary=True is not supported; the fake") as caught:
        config_from_hf(SimpleNamespace(**vars(hf_config), rotary=True))
    assert "\n" not in str(caught.value)
