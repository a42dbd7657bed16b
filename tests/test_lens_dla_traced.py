"""Direct logit attribution on any traced model (issue 28, items 5 and 6; `reslab/lens/dla_traced.py`): on Hugging
Face's Llama, Gemma 2, OLMo-2 and GPT-NeoX (the small `hf:` configs of `reslab audit` / `reslab lens`) the components
plus the bias are the model's own logit; each write is the output of the module it is named by; the frozen lens
is their running sum; the cases whose final stream is no sum are refused in one line; and TransformerLens (its own
weight converters) gives the same logit lens and the same attributions on GPT-2, Llama and Gemma 2."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.errors import ReslabError
from reslab.graph.targets import load_target
from reslab.lens import decompose

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))  # hf: small configs: vocab 128
TARGETS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
NO_CAP = {"final_logit_softcapping": None}  # Gemma 2's final softcapping is not linear: set off for the DLA


def hf_model(model_type: str, **sets) -> nn.Module:
    """hf:MODEL_TYPE as `reslab lens` builds it (graph/targets.py's small config), random weights, every norm gain and
    bias moved off its init so that the norms' own parameters matter."""
    torch.manual_seed(0)
    model = load_target(f"hf:{model_type}", sets, device="cpu").model
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def outputs_of(model: nn.Module, paths: list[str], ids: torch.Tensor) -> list[torch.Tensor]:
    """The first tensor each module returns on `ids`, from forward hooks (not the tracer the DLA reads)."""
    modules, seen = dict(model.named_modules()), {}

    def keep(path):
        def hook(module, args, output):  # returns None: the output is read, not replaced
            seen.setdefault(path, (output[0] if isinstance(output, tuple) else output).clone())
        return hook

    hooks = [modules[path].register_forward_hook(keep(path)) for path in paths]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return [seen[path] for path in paths]


WRITES = {  # each block's writes, named by the module that returns what its residual adds add
    "llama": ("model.layers", ["self_attn", "mlp"]),
    "gemma2": ("model.layers", ["post_attention_layernorm", "post_feedforward_layernorm"]),  # sandwich norms
    "olmo2": ("model.layers", ["post_attention_layernorm", "post_feedforward_layernorm"]),  # output norms
    "gpt_neox": ("gpt_neox.layers", ["attention", "mlp"]),  # parallel: attn + mlp added to one skip, split in two
}


@pytest.mark.parametrize("model_type", list(WRITES))
def test_components_plus_bias_are_the_models_logit_and_each_write_is_its_modules_output(model_type):
    model = hf_model(model_type, **(NO_CAP if model_type == "gemma2" else {}))
    parts = decompose(model, IDS)
    blocks, writes = WRITES[model_type]
    names = [f"{blocks}.{k}.{w}" for k in range(model.config.num_hidden_layers) for w in writes]
    assert parts.names == ["embed", *names]
    with torch.no_grad():
        logits = model(IDS).logits[:, :-1]
    target = logits.gather(-1, IDS[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(parts.target_logit, target, atol=1e-6, rtol=0)
    assert torch.allclose(parts.contributions.sum(0) + parts.bias, target, atol=1e-4, rtol=0)
    assert parts.sum_error < 1e-4 and parts.stream_error < 1e-5
    for name, write, expected in zip(names, parts.writes[1:], outputs_of(model, names, IDS)):
        assert torch.allclose(write, expected.float(), atol=1e-6, rtol=0), name
    assert (parts.contributions.abs().flatten(1).amax(1) > 1e-3).all()  # every component writes something
    if model_type == "gpt_neox":  # LayerNorm with a bias, through the head: the bias term is really there
        assert parts.bias.abs().max() > 1e-3 and parts.norm == "gpt_neox.final_layer_norm"
    else:  # RMSNorm, no head bias
        assert torch.equal(parts.bias, torch.zeros_like(parts.bias)) and parts.norm == "model.norm"


def test_the_frozen_lens_is_the_running_sum_of_each_blocks_writes():
    """`--frozen-norm` decodes each entry with the final norm's scale on the last stream: its logit of the target is
    the bias plus the DLA of the embedding and of every write up to that block (GPT-NeoX: LayerNorm, parallel)."""
    model = hf_model("gpt_neox", num_hidden_layers=3)
    frozen = reslab.lens(model, IDS, TARGETS, keep_logits=True, frozen_norm=True)
    parts = decompose(model, IDS, TARGETS)
    assert parts.entries == ["embed", *[f"gpt_neox.layers.{k}" for k in range(3) for _ in range(2)]]
    per_entry = torch.stack([parts.contributions[[e == name for e in parts.entries]].sum(0) for name in frozen.names])
    decoded = frozen.logits.gather(-1, TARGETS.expand(len(frozen.names), -1, -1).unsqueeze(-1))[..., 0]
    assert torch.allclose(decoded, per_entry.cumsum(0) + parts.bias, atol=1e-4, rtol=0)
    result = dataclasses.replace(frozen, decomposition=parts, refused=None)  # the lens table's DLA column
    assert result.dla == pytest.approx(per_entry.flatten(1).mean(1).tolist(), abs=1e-6)
    assert len(result.columns()["DLA"]) == len(result.names) == 4
    assert result.to_dict()["decomposition"]["entries"]["gpt_neox.layers.2.mlp"] == "gpt_neox.layers.2"


# --- models of one's own (as FILE.py:CALLABLE builds them): what adds up, what is refused ---------------------------


class Block(nn.Module):
    """One residual MLP block: pre-LN `x + f(LN x)`, LayerScale `x + g * f(LN x)`, post-LN `LN(x + f(x))`, or a
    scaled skip `0.5 x + f(LN x)`."""

    def __init__(self, kind: str, width: int = 16):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.gain = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        if self.kind == "post":
            return self.norm(x + self.mlp(x))
        write = self.mlp(self.norm(x))
        if self.kind == "layerscale":
            return x + self.gain * write
        return (0.5 * x if self.kind == "scaled-skip" else x) + write


class Toy(nn.Module):
    def __init__(self, kind: str, vocab: int = 30, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(kind, width), Block(kind, width)])
        self.final = nn.RMSNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.out(self.final(x))


def toy_ids():
    return torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["pre", "layerscale"])
def test_a_models_own_additive_blocks_add_up(kind):
    model, ids = Toy(kind), toy_ids()
    parts = decompose(model, ids)
    assert parts.names == ["embed", "blocks.0.mlp" if kind == "pre" else "mul in blocks.0", *(
        ["blocks.1.mlp"] if kind == "pre" else ["mul in blocks.1"])]
    with torch.no_grad():
        target = model(ids)[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(parts.contributions.sum(0) + parts.bias, target, atol=1e-4, rtol=0)
    assert parts.bias.abs().max() > 1e-3  # the head's bias


@pytest.mark.parametrize("kind, message", [
    ("post", "the stream is normalised by layer_norm in blocks.1.norm on its way from blocks.0 to the final"),
    ("scaled-skip", "the residual in blocks.1 (scaled) adds the stream after scaling, gating or mixing it"),
    ("hf:gemma2", "computed from the head's output by div in (model), tanh in (model), mul in (model)"),
])
def test_a_final_stream_that_is_no_sum_of_writes_is_refused_in_one_line(kind, message):
    model, ids = (hf_model("gemma2"), IDS) if kind == "hf:gemma2" else (Toy(kind), toy_ids())
    with pytest.raises(ReslabError) as error:
        decompose(model, ids)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "the logit lens still applies" in str(error.value)
    reslab.lens(model, ids)  # ... and it does


# --- TransformerLens (3.x), its own weight converters, an explicit config: nothing downloaded -----------------------


def hooked(model: nn.Module, model_type: str):
    """TransformerLens' HookedTransformer with `model`'s weights (LN folded into the next weights, the unembedding
    not centred: its logits are the model's own)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (convert_gemma_weights, convert_gpt2_weights,
                                                                convert_llama_weights)

    c = model.config
    if model_type == "gpt2":
        config = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
            eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
        convert = convert_gpt2_weights
    else:
        gemma = model_type == "gemma2"
        extra = dict(use_normalization_before_and_after=True, attn_scores_soft_cap=c.attn_logit_softcapping,
                     use_local_attn=True, window_size=c.sliding_window, attn_scale=c.query_pre_attn_scalar ** 0.5,
                     attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
                     original_architecture="Gemma2ForCausalLM") if gemma else dict(
                         original_architecture="LlamaForCausalLM")
        config = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=c.max_position_embeddings,
            n_heads=c.num_attention_heads, d_head=c.head_dim, n_key_value_heads=c.num_key_value_heads,
            d_mlp=c.intermediate_size, d_vocab=c.vocab_size, act_fn=c.hidden_activation if gemma else c.hidden_act,
            normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary", rotary_dim=c.head_dim,
            rotary_base=c.rope_parameters["rope_theta"], gated_mlp=True, final_rms=True, default_prepend_bos=False,
            **extra)
        convert = convert_gemma_weights if gemma else convert_llama_weights
    tl = HookedTransformer(config)
    tl.load_and_process_state_dict(convert(model, config), fold_ln=True, center_writing_weights=model_type == "gpt2",
                                   center_unembed=False, fold_value_biases=True)
    return tl.eval()


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2"])
def test_logit_lens_and_dla_match_transformer_lens(model_type):
    model = hf_model(model_type, **(NO_CAP if model_type == "gemma2" else {}))
    tl = hooked(model, model_type)
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(IDS)
        assert torch.allclose(tl_logits, model(IDS).logits, atol=1e-4, rtol=0)  # the conversion is faithful
        tl_lens = tl.unembed(cache.accumulated_resid(apply_ln=True))  # ln_final recomputed on each block's stream
        components, labels = cache.decompose_resid(return_labels=True)
        tl_attrs = cache.logit_attrs(components, tokens=TARGETS)  # ln_final's scale frozen at the final stream's
    ours = reslab.lens(model, IDS, keep_logits=True)
    assert torch.allclose(ours.logits, tl_lens[:, :, :-1], atol=1e-4, rtol=0)
    parts = decompose(model, IDS, TARGETS)
    if model_type == "gpt2":  # TransformerLens' embed + pos_embed is the stream entering the first block
        assert labels[:2] == ["embed", "pos_embed"]
        tl_attrs = torch.cat([tl_attrs[:2].sum(0, keepdim=True), tl_attrs[2:]])
    assert len(parts.names) == len(tl_attrs) == 5
    assert torch.allclose(parts.contributions, tl_attrs, atol=1e-4, rtol=0)
    # TransformerLens leaves the biases (folded into b_U) out of logit_attrs; reslab reports them as `bias`
    assert torch.allclose(tl_attrs.sum(0) + parts.bias, parts.target_logit, atol=1e-4, rtol=0)
    assert parts.contributions.abs().max() > 1e-2
