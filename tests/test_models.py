"""The model zoo: shapes from config, GPT-2's init, GQA, generation, and the book's deep-MLP gradients."""

import math

import pytest
import torch

import reslab
from reslab.models.base import filter_logits
from reslab.reproduce.deep_mlp import BOOK_FIRST_LAYER, mean_abs_gradients


@pytest.mark.parametrize("shortcut, key", [(False, "without_shortcut"), (True, "with_shortcut")])
def test_deep_mlp_reproduces_the_book(shortcut, key):
    grads = mean_abs_gradients(shortcut)
    assert list(grads) == [f"layers.{i}.0.weight" for i in range(5)]
    assert grads["layers.0.0.weight"] == pytest.approx(BOOK_FIRST_LAYER[key], rel=1e-6)


def test_deep_mlp_shortcut_only_where_shapes_match():
    model = reslab.build_model("mlp", layer_sizes=[4, 4, 2, 2, 1], shortcut=True)
    kinds = [type(s).__name__ for s in model.shortcuts]
    assert kinds == ["PlainAdd", "Identity", "PlainAdd", "Identity"]
    assert model(torch.randn(5, 4)).shape == (5, 1)


@pytest.mark.parametrize("name", ["tiny", "gpt", "llama"])
def test_shapes_come_from_config(name):
    model = reslab.build_model(name, vocab_size=17, context=24, width=48, heads=4, layers=3)
    assert len(model.blocks) == 3
    assert model.tok_emb.weight.shape == (17, 48)
    for batch, seq in [(1, 1), (2, 24), (5, 7)]:
        assert model(torch.randint(0, 17, (batch, seq))).logits.shape == (batch, seq, 17)


def test_tiny_defaults_match_the_article():
    model = reslab.build_model("tiny")
    config = model.config
    assert (config.context, config.width, config.heads, config.layers, config.residual) == (64, 64, 2, 1, "post")
    assert model.blocks[0].ffn.up.weight.shape == (128, 64)
    assert isinstance(model.norm, torch.nn.Identity)  # post-LN already normalises the stream


def test_gpt_scaled_residual_init_and_tying():
    torch.manual_seed(0)
    layers = 8
    model = reslab.build_model("gpt", layers=layers, width=256, heads=4)
    assert model.head.weight is model.tok_emb.weight
    expected = 0.02 / math.sqrt(2 * layers)
    for block in model.blocks:
        assert block.attn.out.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.ffn.down.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.ffn.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    untied = reslab.build_model("gpt", tie_embeddings=False, bias=True)
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.blocks[0].attn.qkv.bias is not None


def test_llama_gqa_rope_qknorm():
    model = reslab.build_model("llama", width=64, heads=8, kv_heads=2, qk_norm=True, rope_theta=1e6)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == (64 + 2 * 2 * 8, 64)
    assert attn.q_norm is not None and attn.rope is not None
    assert model.blocks[0].ffn.hidden == 192  # 8/3 * 64 rounded up to a multiple of 64
    # RoPE: logits at a position depend on relative, not absolute, position only through attention; at least
    # check the model is causal: changing a later token leaves earlier logits unchanged.
    idx = torch.randint(0, 65, (1, 10))
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 65
    torch.testing.assert_close(model(idx).logits[:, :7], model(changed).logits[:, :7])


@pytest.mark.parametrize("name", ["tiny", "gpt", "llama"])
def test_models_are_causal(name):
    model = reslab.build_model(name, layers=2).eval()
    idx = torch.randint(0, 65, (2, 12))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 3) % 65
    torch.testing.assert_close(model(idx).logits[:, :9], model(changed).logits[:, :9])


def test_generate_and_filters():
    torch.manual_seed(0)
    model = reslab.build_model("gpt", context=8).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 20, top_k=5, top_p=0.9)
    assert out.shape == (2, 23) and out.max() < 65
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True]]
    # softmax([4,3,2,1]) = [.64, .24, .09, .03]: top_p 0.8 keeps the first two
    assert torch.isinf(filter_logits(logits, None, 0.8)).tolist() == [[False, False, True, True]]
    greedy = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0)
    assert torch.equal(greedy, model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0))


def test_longer_than_context_is_refused():
    model = reslab.build_model("gpt", context=8)
    with pytest.raises(ValueError, match="longer than the model's context 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("gpu2", {}, "unknown model 'gpu2'; choose one of: deepseek, deepseek-v4, gpt, llama, mlp, tiny"),
        ("gpt", {"residual": "bogus"}, "unknown residual scheme 'bogus'; choose one of: .*pre"),
        ("gpt", {"width": 100, "heads": 3}, "width 100 is not divisible by heads 3"),
        ("llama", {"heads": 4, "kv_heads": 3}, "heads 4 is not divisible by kv_heads 3; choose kv_heads among 1, 2, 4"),
        ("tiny", {"layers": 0}, "layers must be positive"),
        ("gpt", {"width": -8}, "width must be positive"),
        ("gpt", {"kv_heads": 2}, "GPTConfig has no field 'kv_heads'"),
        ("mlp", {"layer_sizes": [3]}, "at least an input and an output"),
        ("gpt", {"activation": "swish"}, "unknown activation 'swish'; choose one of: gelu, gelu-tanh, relu, relu2"),
    ],
)
def test_bad_config_errors(name, overrides, message):
    with pytest.raises(reslab.ReslabError, match=message):
        reslab.build_model(name, **overrides)


@pytest.mark.parametrize("activation, expected", [
    ("gelu-tanh", lambda h: torch.nn.functional.gelu(h, approximate="tanh")),
    ("gelu", torch.nn.functional.gelu),
    ("relu", torch.relu),
    ("relu2", lambda h: torch.relu(h) ** 2),
])
def test_gpt_mlp_activation(activation, expected):
    net = reslab.build_model("gpt", layers=1, width=16, heads=2, context=8, vocab_size=11, activation=activation)
    mlp = net.blocks[0].ffn
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(mlp(x), mlp.down(expected(mlp.up(x))))
