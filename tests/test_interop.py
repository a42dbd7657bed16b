"""reslab's GPT-2 and Llama-family models against Hugging Face's: same weights, same logits (fp32, atol 1e-5).

The HF models are random-initialised from tiny configs (no downloads). Every parameter is then re-drawn with a
fixed seed, norm gains and biases included, so that a swapped or mis-mapped weight (ln_1 vs ln_2, q vs k, gate vs
up) changes the logits instead of hiding behind HF's all-ones / all-zeros init.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.errors import ReslabError
from reslab.interop import config_from_hf, from_hf, load_hf_checkpoint, to_hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB, CONTEXT, SEQ = 101, 32, 16


def gpt2_config(**changes) -> object:
    values = dict(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
                  bos_token_id=None, eos_token_id=None)
    return transformers.GPT2Config(**{**values, **changes})


def llama_config(**changes) -> object:
    values = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
                  bos_token_id=None, eos_token_id=None)
    return transformers.LlamaConfig(**{**values, **changes})


def qwen3_config(**changes) -> object:
    values = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                  bos_token_id=None, eos_token_id=None)
    return transformers.Qwen3Config(**{**values, **changes})


def mistral_config(**changes) -> object:
    values = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, intermediate_size=96, sliding_window=None,
                  bos_token_id=None, eos_token_id=None)
    return transformers.MistralConfig(**{**values, **changes})


def scramble_(model: nn.Module, seed: int) -> None:
    """Re-draw every parameter: matrices N(0, 0.1^2), norm gains 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            gain = param.ndim == 1 and name.endswith("weight")
            param.copy_(1.0 + 0.2 * noise if gain else 0.1 * noise)


def hf_model(config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    scramble_(model, seed + 1)
    return model.float().eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(hf: nn.Module, ours: nn.Module, label: str) -> float:
    """Max |logit difference| on a fixed batch; printed (see `pytest -s`) so the report can quote it."""
    idx = tokens()
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx).logits
    assert got.shape == expected.shape
    assert expected.std() > 0.1, "logits too small for the comparison to mean anything"
    diff = (got - expected).abs().max().item()
    print(f"\n[interop] {label}: max |logit diff| = {diff:.3g} (logit std {expected.std():.3g})")
    return diff


# --- HF -> reslab: logits -----------------------------------------------------------------------------------------

PARITY_CASES = {
    "gpt2-tied": gpt2_config(),
    "gpt2-untied": gpt2_config(tie_word_embeddings=False, layer_norm_epsilon=1e-6),
    "gpt2-exact-gelu": gpt2_config(activation_function="gelu"),
    "gpt2-relu2": gpt2_config(activation_function="relu2"),
    "llama-gqa": llama_config(rope_theta=500000.0),
    "llama-mha-tied": llama_config(num_key_value_heads=4, tie_word_embeddings=True),
    "llama-head_dim-32": llama_config(head_dim=32),
    "qwen3-untied": qwen3_config(),
    "qwen3-tied-mqa": qwen3_config(num_key_value_heads=1, tie_word_embeddings=True, head_dim=32),
    "mistral": mistral_config(),
}


@pytest.mark.parametrize("label", list(PARITY_CASES))
def test_from_hf_matches_hf_logits(label):
    hf = hf_model(PARITY_CASES[label])
    ours = from_hf(hf)
    assert not ours.training
    assert max_logit_diff(hf, ours, label) <= ATOL


def test_from_hf_respects_tied_embeddings():
    tied, untied = from_hf(hf_model(qwen3_config(tie_word_embeddings=True))), from_hf(hf_model(qwen3_config()))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert not torch.equal(untied.head.weight, untied.tok_emb.weight)


def test_from_hf_copies_weights_instead_of_sharing_them():
    hf = hf_model(gpt2_config())
    ours = from_hf(hf)
    before = ours.tok_emb.weight.clone()
    with torch.no_grad():
        hf.transformer.wte.weight.zero_()
    assert torch.equal(ours.tok_emb.weight, before)


def test_config_from_hf_maps_fields():
    name, overrides = config_from_hf(qwen3_config(rope_theta=1e6, rms_norm_eps=1e-6, head_dim=32))
    assert name == "llama"
    assert overrides | {"init_std": 0.02} == {
        "vocab_size": VOCAB, "context": CONTEXT, "width": 64, "layers": 2, "heads": 4, "kv_heads": 2,
        "head_dim": 32, "ffn_hidden": 96, "rope_theta": 1e6, "qk_norm": True, "tie_embeddings": False,
        "norm_eps": 1e-6, "init_std": 0.02, "dropout": 0.0, "residual": "pre",
    }
    name, overrides = config_from_hf(gpt2_config(layer_norm_epsilon=1e-6))
    assert (name, overrides["context"], overrides["norm_eps"], overrides["bias"]) == ("gpt", CONTEXT, 1e-6, True)
    reslab.make_config(name, **overrides)  # a valid reslab config


# --- reslab -> HF -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, name, overrides", [
    ("reslab gpt bias=False -> HF", "gpt", dict(bias=False, tie_embeddings=True)),
    ("reslab gpt bias=True untied -> HF", "gpt", dict(bias=True, tie_embeddings=False)),
    ("reslab gpt exact gelu -> HF", "gpt", dict(bias=False, activation="gelu")),
    ("reslab gpt relu2 -> HF", "gpt", dict(bias=False, activation="relu2")),
    ("reslab llama -> HF", "llama", dict(kv_heads=2)),
    ("reslab llama qk_norm -> HF qwen3", "llama", dict(kv_heads=1, qk_norm=True, tie_embeddings=True)),
])
def test_to_hf_matches_reslab_logits(label, name, overrides):
    torch.manual_seed(0)
    ours = reslab.build_model(name, vocab_size=VOCAB, context=CONTEXT, width=64, layers=2, heads=4, **overrides)
    scramble_(ours, 3)
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(ours), attn_implementation="eager").eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert max_logit_diff(hf, ours, label) <= ATOL


def test_to_hf_refuses_other_residual_schemes():
    model = reslab.build_model("gpt", vocab_size=VOCAB, context=CONTEXT, width=64, layers=1, heads=4, residual="post")
    with pytest.raises(ReslabError, match="residual='pre'"):
        to_hf_state_dict(model)


# --- local checkpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, config, shard", [
    ("checkpoint gpt2", gpt2_config(), None),
    ("checkpoint qwen3 sharded", qwen3_config(), "40KB"),
    ("checkpoint llama tied", llama_config(tie_word_embeddings=True), None),
])
def test_load_hf_checkpoint_round_trip(tmp_path, label, config, shard):
    hf = hf_model(config)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert max_logit_diff(hf, load_hf_checkpoint(tmp_path), label) <= ATOL


def test_pickle_checkpoint_is_refused(tmp_path):
    gpt2_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ReslabError, match="pytorch_model.bin.*safetensors"):
        load_hf_checkpoint(tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ReslabError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def _edit_checkpoint(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_weight_is_named(tmp_path):
    hf_model(gpt2_config()).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ReslabError, match=r"h\.1\.mlp\.c_fc\.bias"):
        load_hf_checkpoint(tmp_path)


def test_extra_weight_is_named(tmp_path):
    hf_model(llama_config()).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ReslabError, match=r"layers\.2\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    hf_model(llama_config()).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ReslabError, match=r"'norm\.weight' has shape \(63,\)"):
        load_hf_checkpoint(tmp_path)


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    hf_model(gpt2_config()).save_pretrained(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ReslabError, match=r'pip install "reslab\[hf\]"'):
        load_hf_checkpoint(tmp_path)


# --- refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, fragment", [
    (lambda: gpt2_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (lambda: gpt2_config(activation_function="silu"), "activation 'silu'"),
    (lambda: gpt2_config(n_inner=100), "n_inner=100"),
    (lambda: llama_config(attention_bias=True), "attention_bias=True"),
    (lambda: llama_config(mlp_bias=True), "mlp_bias=True"),
    (lambda: llama_config(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda: llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE scaling 'linear'"),
    (lambda: qwen3_config(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding_attention"),
    (lambda: mistral_config(sliding_window=8), "sliding_window=8"),
    (lambda: transformers.BertConfig(), "model type 'bert'"),
])
def test_unsupported_features_are_refused(config, fragment):
    with pytest.raises(ReslabError, match=fragment.replace("(", r"\(").replace("[", r"\[")) as caught:
        config_from_hf(config())
    assert "\n" not in str(caught.value) and "; " in str(caught.value)  # one line: the problem; the fix


def test_sliding_window_covering_the_context_is_accepted():
    name, overrides = config_from_hf(mistral_config(sliding_window=CONTEXT))
    assert name == "llama" and overrides["kv_heads"] == 1
