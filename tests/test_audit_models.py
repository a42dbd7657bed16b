"""The audit on real architectures, built from config on the meta device: reslab's own models under every
residual scheme, and Hugging Face transformers models."""

import pytest
import torch

import reslab
from reslab.graph import KINDS, audit
from reslab.graph.residuals import ACROSS_KINDS
from reslab.graph.targets import load_target
from reslab.residual import get_scheme

# What each scheme's residuals are, by the definitions in reslab/graph/residuals.py; None: no residual at all. A kind
# is that of the two residuals per block (around attention, around the FFN); a tuple gives the four of a 2-block
# model in order. Connections across depth come on top of these: `depth_connections` below reads them off the
# model as built. A scheme missing here fails `test_every_scheme_of_every_model`: a new scheme says what its
# audit must be.
SCHEME_KINDS = {
    "none": None, "post-none": None, "article-edit": None,
    "pre": "identity", "sandwich": "identity", "add": "identity",
    "post": "normalized", "deepnorm": "normalized",
    "rezero": "scaled", "layerscale": "scaled",
    "hc": "multi-stream", "mhc": "multi-stream", "mhc-lite": "multi-stream", "mhc-v4": "multi-stream",
    "frac": "multi-stream",  # hyper-connections over fractions of the width
    "gated-hc": "gated",  # every stream's identity skip, the write weighted by 2 sigmoid(W_inj Hn / n) of the data
    "attnres": "depth-attention",  # the sublayer output joins the stack of sources a depth attention reads
    "value-residual": "identity",  # its pre-LN adds; the value mix is one more residual, VALUE_MIX below
    "olmo2": "identity", "completep": "scaled",
    "mix-ln": "identity",  # floor(0.25 * 2) = 0 post-LN blocks at 2 layers; deeper: tests/test_schemes_2026.py
    # rw+lr: alpha F(LN x) + beta (I + W_R W_L) x, one residual whose branch holds the low-rank map (other forms:
    # test_laurel_forms_read_alike_on_every_model)
    "laurel": "scaled",
    "scales": "scaled",  # a x + b F(LN x)
    # connections on pre-LN: the blocks' own residuals stay pre-LN's (tests/test_audit_depth.py checks more depths)
    "x0": "identity", "unet": "identity", "long-skip": "identity", "value-embed": "identity",
    "backout": "identity", "denseformer": "identity",
    # MUDD (qkvr): block 1's attention reads Q, K, V, rows of the mix whose row R is its skip: a skip through a mix
    # of streams
    "mudd": ("identity", "identity", "multi-stream", "identity"),
    "speedrun": "scaled",  # scales' a x + b F(LN x) under x0, long-skip and value-embed
    # ResiDual: post-LN x = LN(x + F(x)) at every site, plus the dual stream's first add d = x0 + F(x0) (an identity
    # around blocks.0.attn, popped below); its later adds d + s F(x) are no residual (F reads x, not d)
    "resi-dual": "normalized",
    # AltUp, four per block: the predict step, attention, FFN, and the correct step gated by the router
    "altup": ("identity", "identity", "identity", "gated") * 2,
}


def site_of(module_path: str) -> str:
    """blocks.1.attn_residual.connections.x0 -> blocks.1.attn_residual (the site whose forward runs the part)."""
    return module_path.split(".connections.")[0]


def boundary(j: int) -> str:
    """X_j of a dense sum: the embedding (the first block's input) for 0, block j-1's output after that."""
    return "blocks.0:in" if j == 0 else f"blocks.{j - 1}:out"


def depth_connections(model) -> list[tuple[str, str, str]]:
    """(owner, skip_from, kind) of every connection across depth, read off the modules the model was built with
    (their sources and destinations), sorted. A skip from block d-1's output (or the embedding) into block d only
    rescales the stream that block receives: it connects nothing and the audit must not report it."""
    from reslab.residual.depth.backout import BackoutHead
    from reslab.residual.depth.base import Connection

    found = []
    heads = [path for path, m in model.named_modules() if isinstance(m, BackoutHead)]
    for path, part in model.named_modules():
        if not isinstance(part, Connection):
            continue
        name, layer, site = part.name, part.spec.layer, site_of(path)
        if name == "x0" and part.coefficient is not None and layer > 0:
            found.append((site, "blocks.0:in", part.kind))
        elif name in ("unet", "long-skip") and part.weight is not None and part.source < layer - 1:
            found.append((site, f"blocks.{part.source}:out", part.kind))
        elif name == "backout" and part.weight is not None:
            found.append((heads[0], f"blocks.{layer}:out", part.kind))
        elif name == "denseformer" and part.alpha is not None:
            found += [(site, boundary(j), part.kind) for j in part.sources[:-1]]
        elif name == "mudd" and part.w1 is not None:
            found += [(site, boundary(j), part.kind) for j in range(layer + 1)]
        elif name == "value-embed" and part.lambdas is not None:
            table = f"blocks.{part.bank}.attn_residual.connections.value_embed"
            found.append((f"blocks.{layer}.attn", f"{table}:embedding", part.kind))
    return sorted(found)


def audited_connections(result) -> list[tuple[str, str, str]]:
    return sorted((r.owner, r.skip_from, r.kind) for r in result.residuals if r.kind in ACROSS_KINDS)


def value_mix(layer: int) -> dict:
    """value-residual's `v = lerp(v_1, v, m)` in blocks.LAYER.attn (LAYER >= 1): the skip is the first layer's
    values, which leave blocks.0 in the ValueStream; the branch is everything from there to this layer's value
    projection; `m` is a constant (or a learned per-head parameter), so the lerp is `scaled`."""
    return {"owner": f"blocks.{layer}.attn", "skip_from": "blocks.0:out",
            "wraps": [f"blocks.{i}" for i in range(layer)] + [f"blocks.{layer}.attn_residual.norm",
                                                                f"blocks.{layer}.attn.qkv"],
            "kind": "scaled"}


def meta_build(name: str, **config):
    with torch.device("meta"):
        return reslab.build_model(name, **config)


def meta_audit(name: str, model=None, **config):
    model = model if model is not None else meta_build(name, **config)
    return audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),), name)


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])
@pytest.mark.parametrize("scheme", reslab.list_schemes())
def test_every_scheme_of_every_model(model, scheme):
    assert scheme in SCHEME_KINDS, f"scheme {scheme!r} is new: add what its audit must say to SCHEME_KINDS"
    built = meta_build(model, layers=2, residual=scheme)
    result = meta_audit(model, built)
    assert [b.path for b in result.blocks] == ["blocks.0", "blocks.1"]
    assert all(r.kind in KINDS for r in result.residuals)
    if not get_scheme(scheme).has_skip:
        assert result.residuals == [], f"{scheme} has no skip, yet the audit found {result.residuals}"
        assert result.summary() == {"residual_count": 0, "blocks_with_residuals": 0, "blocks_without": 2}
        return
    expected = SCHEME_KINDS[scheme]
    assert expected is not None, f"scheme {scheme} has a skip but SCHEME_KINDS says it has none"
    assert result.dead == [] and result.not_run == []
    assert audited_connections(result) == depth_connections(built)  # none missed, none made up
    residuals = [r for r in result.residuals if r.kind not in ACROSS_KINDS]
    if scheme == "value-residual":  # after blocks.0's two, before blocks.1's attention residual (it runs inside)
        assert residuals.pop(2).to_dict() == value_mix(1)
    if scheme == "resi-dual":
        extra = residuals.pop(1)
        assert (extra.owner, extra.skip_from, list(extra.wraps), extra.kind) == (
            "blocks.0.attn_residual", "blocks.0.attn_residual:in", ["blocks.0.attn"], "identity")
    kinds = list(expected) if isinstance(expected, tuple) else [expected] * 4
    assert [r.kind for r in residuals] == kinds  # two per block: around attention, around the FFN
    if scheme == "altup":  # four per block; their owners and wraps: tests/test_scheme_altup.py
        return
    for layer in range(2):
        attn, ffn = residuals[2 * layer: 2 * layer + 2]
        assert f"blocks.{layer}.attn" in attn.wraps and f"blocks.{layer}.ffn" not in attn.wraps
        assert f"blocks.{layer}.ffn" in ffn.wraps and f"blocks.{layer}.attn" not in ffn.wraps
        assert attn.owner == f"blocks.{layer}.attn_residual" and ffn.owner == f"blocks.{layer}.ffn_residual"


# LAuReL's forms on pre-LN: `lr` adds `(I + W_R W_L) x`, the low-rank map beside the sublayer, so the branch of the
# one residual holds it; rw's alpha and beta make it scaled; gemma3n's LaurelBlock `h + N(W_R W_L h)` on the
# normalised input is a residual of its own inside the attention site (Gemma 3n's as in tests/test_audit_zoo.py).
LAUREL = {"lr": "identity", "rw": "scaled", "rw+lr": "scaled", "gemma3n": "identity"}


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])
@pytest.mark.parametrize("form", list(LAUREL))
def test_laurel_forms_read_alike_on_every_model(model, form):
    """The low-rank term is no projection shortcut of its own (it once was on gpt and not on llama: LayerNorm's
    affine op counted as one more learned op on the branch than RMSNorm's scale, which decided `_deeper`)."""
    result = meta_audit(model, layers=2, residual="laurel", residual_options={"laurel_form": form})
    low_rank = ["blocks.{}.{}_residual.laurel.linear_left", "blocks.{}.{}_residual.laurel.linear_right"]
    expected = []
    for layer in range(2):
        for site in ("attn", "ffn"):
            sublayer = [f"blocks.{layer}.{site}_residual.norm", f"blocks.{layer}.{site}"]
            if form == "gemma3n":
                expected.append((f"blocks.{layer}.{site}_residual", sublayer + [f"blocks.{layer}.{site}_residual."
                                                                                "norm_out"], "identity"))
                if site == "attn":
                    laurel = f"blocks.{layer}.attn_residual.laurel"
                    expected.append((laurel, [f"{laurel}.linear_left", f"{laurel}.linear_right",
                                              f"{laurel}.post_laurel_norm"], "identity"))
            else:
                extra = [p.format(layer, site) for p in low_rank] if "lr" in form else []
                expected.append((f"blocks.{layer}.{site}_residual", sublayer + extra, LAUREL[form]))
    assert [(r.owner, list(r.wraps), r.kind) for r in result.residuals] == expected
    assert all(r.skip_from == f"{r.owner}:in" for r in result.residuals)


@pytest.mark.parametrize("learned", [False, True])
def test_value_residual_mixes_are_scaled_skips_from_the_first_layer(learned):
    result = meta_audit("llama", layers=3, residual="value-residual",
                        residual_options={"value_mix_learned": learned})
    assert [r.to_dict() for r in result.residuals if r.owner.endswith(".attn")] == [value_mix(1), value_mix(2)]
    assert [r.kind for r in result.residuals if not r.owner.endswith(".attn")] == ["identity"] * 6


@pytest.mark.parametrize("block", [0, 1])
def test_attnres_full_and_block_one_depth_attention_per_sublayer(block):
    result = meta_audit("gpt", layers=4, residual="attnres", residual_options={"attnres_block": block})
    assert [r.kind for r in result.residuals] == ["depth-attention"] * 8
    expected = [f"blocks.{i}.{s}_residual" for i in range(4) for s in ("attn", "ffn")]
    assert [r.owner for r in result.residuals] == expected
    assert result.residuals[3].wraps == ("blocks.1.ffn_residual.norm", "blocks.1.ffn")
    assert all(r.skip_from == f"{r.owner}:in" for r in result.residuals)


def test_pre_ln_reports_the_norm_on_the_branch_and_two_per_block():
    result = meta_audit("llama", layers=3, residual="pre")
    assert result.summary() == {"residual_count": 6, "blocks_with_residuals": 3, "blocks_without": 0}
    first = result.residuals[0].to_dict()
    assert first == {"owner": "blocks.0.attn_residual", "skip_from": "blocks.0.attn_residual:in",
                     "wraps": ["blocks.0.attn_residual.norm", "blocks.0.attn"], "kind": "identity"}
    assert result.lines()[1] == ("blocks.0: 2 residuals — around attn (+attn_residual.norm), around ffn "
                                 "(+ffn_residual.norm); none inside attn, none inside ffn")
    assert result.modules["blocks.0"] == 2 and result.modules[""] == 6 and result.modules["blocks.0.attn"] == 0


def test_article_edit_has_no_residual_and_dead_sublayers():
    """The TinyTransformer article's ablation: deleting `x = x + output` left attention and FFN computed and
    thrown away. The audit must say exactly that."""
    with torch.device("meta"):
        model = reslab.build_model("tiny", residual="article-edit")
    result = audit(model, (torch.zeros(1, 8, dtype=torch.long, device="meta"),))
    assert result.residuals == []
    assert result.dead == ["blocks.0.attn", "blocks.0.ffn"]
    assert "blocks.0: 0 residuals; attn is dead, ffn is dead" in result.lines()
    # the honest control keeps the sublayers alive
    honest = meta_audit("tiny", residual="post-none")
    assert honest.residuals == [] and honest.dead == []


def test_deep_mlp_shortcuts_wrap_their_layer():
    result = audit(reslab.build_model("mlp"), (torch.ones(1, 3),))
    assert [r.owner for r in result.residuals] == [f"shortcuts.{i}" for i in range(4)]  # not the last (3 -> 1)
    assert [r.wraps for r in result.residuals] == [(f"layers.{i}",) for i in range(4)]
    without = audit(reslab.build_model("mlp", shortcut=False), (torch.ones(1, 3),))
    assert without.residuals == []


# --- Hugging Face transformers ------------------------------------------------------------------------------------
HF = {
    # model type: (blocks, residuals per block, kind, owner of the first residual, its wraps). hf: builds the class a
    # user would load, with its LM head: GPT2LMHeadModel (blocks under `transformer`), *ForCausalLM (under `model`).
    "gpt2": (["transformer.h.0", "transformer.h.1"], 2, "identity", "transformer.h.0",
             ["transformer.h.0.ln_1", "transformer.h.0.attn"]),
    "llama": (["model.layers.0", "model.layers.1"], 2, "identity", "model.layers.0",
              ["model.layers.0.input_layernorm", "model.layers.0.self_attn"]),
    "qwen3": (["model.layers.0", "model.layers.1"], 2, "identity", "model.layers.0",
              ["model.layers.0.input_layernorm", "model.layers.0.self_attn"]),
    "mistral": (["model.layers.0", "model.layers.1"], 2, "identity", "model.layers.0",
                ["model.layers.0.input_layernorm", "model.layers.0.self_attn"]),
}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type", list(HF))
def test_hf_decoders(transformers, model_type):
    blocks, per_block, kind, owner, wraps = HF[model_type]
    target = load_target(f"hf:{model_type}")
    result = audit(target.model, target.inputs)
    assert all(p.device.type == "meta" for p in target.model.parameters())
    assert [b.path for b in result.blocks] == blocks
    assert len(result.residuals) == per_block * len(blocks)
    assert {r.kind for r in result.residuals} == {kind}
    assert result.residuals[0].owner == owner and list(result.residuals[0].wraps) == wraps
    assert result.residuals[0].skip_from == f"{owner}:in"
    assert result.residuals[1].wraps[-1].endswith("mlp")
    assert result.dead == [] and result.not_run == []


def test_hf_llama_summary_line(transformers):
    target = load_target("hf:llama", {"num_hidden_layers": 3})
    result = audit(target.model, target.inputs)
    assert len(result.blocks) == 3
    assert ("model.layers.2: 2 residuals — around self_attn (+input_layernorm), around mlp "
            "(+post_attention_layernorm); none inside self_attn, none inside mlp") in result.lines()


def test_hf_bert_post_ln_add_inside_the_submodule_that_receives_the_skip(transformers):
    target = load_target("hf:bert")
    result = audit(target.model, target.inputs)
    assert len(result.residuals) == 4 and {r.kind for r in result.residuals} == {"normalized"}
    attn, ffn = result.residuals[:2]
    # BertSelfOutput.forward(hidden_states, input_tensor) performs LayerNorm(dense(h) + input_tensor)
    assert attn.owner == "bert.encoder.layer.0.attention.output"
    assert attn.skip_from == "bert.encoder.layer.0.attention:in"
    assert attn.wraps == ("bert.encoder.layer.0.attention.self", "bert.encoder.layer.0.attention.output.dense")
    assert ffn.owner == "bert.encoder.layer.0.output" and ffn.skip_from == "bert.encoder.layer.0.attention:out"
    assert result.modules["bert.encoder.layer.0.attention"] == 1


def test_hf_t5_encoder_decoder(transformers):
    target = load_target("hf:t5")
    result = audit(target.model, target.inputs)
    assert [b.path for b in result.blocks] == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                               "decoder.block.1"]
    assert [len(b.residuals) for b in result.blocks] == [2, 2, 3, 3]  # the decoder adds cross-attention
    cross = result.residuals[5]
    assert cross.owner == "decoder.block.0.layer.1" and cross.wraps[-1] == "decoder.block.0.layer.1.EncDecAttention"
    # the encoder output feeds the cross-attention keys and values, but it is not that residual's skip
    assert cross.skip_from == "decoder.block.0.layer.1:in"
    assert {r.kind for r in result.residuals} == {"identity"}


def test_hf_vit(transformers):
    target = load_target("hf:vit")
    assert set(target.inputs) == {"pixel_values"}
    result = audit(target.model, target.inputs)
    assert len(result.blocks) == 2 and len(result.residuals) == 4
    assert {r.kind for r in result.residuals} == {"identity"}
    assert result.summary()["blocks_without"] == 0
