"""reslab lens on any model (issue 28): blocks, stream, final norm and head found from the traced graph
(`reslab/lens/traced.py`), checked against Hugging Face's own hidden states and logits, TransformerLens, and
reslab's decomposition; the frozen-final-scale variant; refusals; the CLI on hf: and FILE.py:CALLABLE targets."""

import json

import pytest
import torch
import torch.nn as nn

import reslab
from reslab.errors import ReslabError
from reslab.graph.targets import load_target

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))  # hf: small configs: vocab 128


def hf_model(model_type: str, **sets) -> nn.Module:
    """hf:MODEL_TYPE as `reslab audit` and `reslab lens` build it (graph/targets.py's small config), random weights,
    norm gains and biases moved off their init so the norm's own parameters matter."""
    torch.manual_seed(0)
    model = load_target(f"hf:{model_type}", sets, device="cpu").model
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model.eval()


def by_hand(model: nn.Module, model_type: str, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens written out with Hugging Face's own module names (the reference, not the lens's way)."""
    if model_type == "gpt2":
        return model.lm_head(model.transformer.ln_f(hidden))
    logits = model.lm_head(model.model.norm(hidden))
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("model_type, norm, blocks", [
    ("llama", "model.norm", "model.layers"),
    ("gpt2", "transformer.ln_f", "transformer.h"),
    ("gemma2", "model.norm", "model.layers"),  # softcapped logits: tanh(logits / 30) * 30 after the head
])
def test_traced_lens_is_hugging_faces_hidden_states_through_its_final_norm_and_head(model_type, norm, blocks):
    model = hf_model(model_type)
    result = reslab.lens(model, IDS, keep_logits=True)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        layers = model.config.num_hidden_layers
        expected = [by_hand(model, model_type, out.hidden_states[k])[:, :-1] for k in range(layers)]
    assert result.names == ["embed", *[f"{blocks}.{k}" for k in range(layers)]]
    assert torch.allclose(result.logits[-1], out.logits[:, :-1], atol=1e-5, rtol=0)  # the model's own logits
    for k in range(layers):  # hidden_states[k]: the stream entering layer k (embed, then each block's output)
        assert torch.allclose(result.logits[k], expected[k], atol=1e-5, rtol=0), k
    assert result.kl[-1] == pytest.approx(0, abs=1e-6) and result.agreement[-1] == 1.0 and result.kl[0] > 1e-4
    assert result.modules["final_norm"] == [norm] and result.modules["head"].startswith("lm_head (linear")
    assert result.modules["streams"]["embed"] == f"{blocks}.0:in" and result.norm == "recomputed"
    assert result.modules["after_head"] == (["div in (model)", "tanh in (model)", "mul in (model)"]
                                            if model_type == "gemma2" else [])


def hooked(hf_gpt2: nn.Module):
    """TransformerLens' HookedTransformer with the same weights (config given explicitly: nothing downloaded; LN
    folded into the next weights, unembedding not centred, so its logits are the model's own)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_gpt2.config
    config = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
    model = HookedTransformer(config)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_gpt2, config), fold_ln=True,
                                      center_writing_weights=True, center_unembed=False, fold_value_biases=True)
    return model.eval()


def test_both_norm_variants_match_transformer_lens_on_gpt2():
    model = hf_model("gpt2", n_layer=3)
    tl = hooked(model)
    with torch.no_grad():
        tl_logits, cache = tl.run_with_cache(IDS)
        assert torch.allclose(tl_logits, model(IDS).logits, atol=1e-4, rtol=0)
        streams = cache.accumulated_resid()  # resid_pre of each block, then the final resid_post
        recomputed = tl.unembed(cache.accumulated_resid(apply_ln=True))  # ln_final on each stream: the logit lens
        frozen = tl.unembed(cache.apply_ln_to_stack(streams, recompute_ln=False))  # ln_final's cached scale
    ours = reslab.lens(model, IDS, keep_logits=True)
    ours_frozen = reslab.lens(model, IDS, keep_logits=True, frozen_norm=True)
    assert len(ours.names) == streams.shape[0] == 4
    assert torch.allclose(ours.logits, recomputed[:, :, :-1], atol=1e-4, rtol=0)
    assert torch.allclose(ours_frozen.logits, frozen[:, :, :-1], atol=1e-4, rtol=0)
    assert (ours_frozen.logits[0] - ours.logits[0]).abs().max() > 1e-2  # the two variants are not the same lens
    assert ours_frozen.norm == "frozen" and ours_frozen.to_dict()["norm"] == "frozen"


@pytest.mark.parametrize("name", ["gpt", "llama"])  # LayerNorm and RMSNorm
def test_frozen_lens_on_a_reslab_model_is_the_running_sum_of_its_direct_logit_attributions(name):
    torch.manual_seed(0)
    model = reslab.build_model(name, layers=2, width=32, heads=2, context=16, vocab_size=40, residual="pre")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    frozen = reslab.lens(model, ids, keep_logits=True, frozen_norm=True)
    parts = frozen.decomposition  # decompose.py: the final stream split into writes, the norm's scale frozen
    target_logits = frozen.logits.gather(-1, ids[:, 1:].expand(len(frozen.names), -1, -1).unsqueeze(-1))[..., 0]
    assert torch.allclose(target_logits, parts.contributions.cumsum(0) + parts.bias, atol=1e-4, rtol=0)
    recomputed = reslab.lens(model, ids, keep_logits=True)
    assert torch.allclose(frozen.logits[-1], recomputed.logits[-1], atol=1e-5, rtol=0)
    assert not torch.allclose(frozen.logits[0], recomputed.logits[0], atol=1e-2)


# --- small models built here: names that lie, and the cases the lens must refuse -------------------------------------


class Doubler(nn.Module):
    """x + W x with W = I: the block doubles the stream."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.proj.weight)

    def forward(self, x):
        return x + self.proj(x)


class SequenceNorm(nn.Module):
    """A norm over positions and channels together: it mixes positions."""

    def forward(self, x):
        return x / x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


class Toy(nn.Module):
    """Embedding, two doubling blocks, a final norm and a head, each configurable; its names say the opposite of
    what its modules do (`head` is the RMSNorm, `norm` the unembedding)."""

    def __init__(self, tail: str = "lm", between: bool = False, vocab: int = 20, width: int = 16):
        super().__init__()
        self.tail, self.between = tail, between
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Doubler(width), Doubler(width)])
        self.head = SequenceNorm() if tail == "sequence-norm" else nn.RMSNorm(width)
        self.norm = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(torch.tanh(x) if self.between and layer is self.layers[1] else x)
        if self.tail == "no-head":
            return self.head(x)
        if self.tail == "pooled":
            return self.norm(self.head(x).mean(1))
        return self.norm(self.head(x))


def toy_ids():
    return torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(3))


def test_the_frozen_norm_differs_where_it_must_and_names_do_not_matter():
    """Streams e, 2e, 4e: an RMSNorm recomputed on each gives the same logits at every entry (KL 0); frozen at 4e's
    scale, entry k's logits are the output's times 2^(k-2)."""
    torch.manual_seed(0)
    model, ids = Toy(), toy_ids()
    recomputed = reslab.lens(model, ids, keep_logits=True)
    frozen = reslab.lens(model, ids, keep_logits=True, frozen_norm=True)
    assert recomputed.names == ["embed", "layers.0", "layers.1"]
    assert max(abs(kl) for kl in recomputed.kl) < 1e-5
    for k, factor in enumerate((0.25, 0.5, 1.0)):
        assert torch.allclose(frozen.logits[k], factor * recomputed.logits[-1], atol=1e-5, rtol=0)
    assert frozen.kl[0] > frozen.kl[1] > 1e-3 and frozen.entropy[0] > frozen.entropy[1] > frozen.entropy[2]
    assert recomputed.modules["final_norm"] == ["head"]  # found from the graph: the RMSNorm is called `head`
    assert recomputed.modules["head"] == "norm (linear, weight norm.weight)"


@pytest.mark.parametrize("model, message", [
    (Toy(tail="sequence-norm"), "head, norm mixes positions"),
    (Toy(tail="no-head"), "no unembedding reachable from the stream: walking back from the logits, rms_norm in head"),
    (Toy(tail="pooled"), "not one row of logits per position"),
    (Toy(between=True), "layers.1 does not read layers.0's output: the stream is not carried"),
    (nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20)), "block 0 returns no value shaped like its input"),
])
def test_the_lens_refuses_in_one_line_naming_the_module(model, message):
    with pytest.raises(ReslabError) as error:
        reslab.lens(model, toy_ids())
    assert message in str(error.value) and "\n" not in str(error.value)


def test_frozen_norm_is_refused_without_a_norm_scale():
    class NoNorm(Toy):
        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.norm(x)

    with pytest.raises(ReslabError, match="no per-position scale .* between layers.1 and the head"):
        reslab.lens(NoNorm(), toy_ids(), frozen_norm=True)
    assert reslab.lens(NoNorm(), toy_ids()).modules["final_norm"] == []


# --- the command line -----------------------------------------------------------------------------------------------

CALLABLE = '''
import torch, torch.nn as nn, torch.nn.functional as F

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    def forward(self, x):
        return x + self.mlp(F.layer_norm(x, (16,)))

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(30, 16)
        self.stack = nn.ModuleList([Block() for _ in range(3)])
        self.final = nn.LayerNorm(16)
        self.out = nn.Linear(16, 30)
    def forward(self, ids):
        x = self.tokens(ids)
        for block in self.stack:
            x = block(x)
        return self.out(self.final(x))

def make():
    torch.manual_seed(0)
    return Model(), (torch.zeros(1, 12, dtype=torch.long),)
'''


def test_cli_lens_on_a_callable_and_on_hf_with_set_and_frozen_norm(cli, tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(CALLABLE)
    code, out, err = cli("lens", f"{path}:make", "--eval-tokens", "48", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert [row["name"] for row in record["layers"]] == ["embed", "stack.0", "stack.1", "stack.2"]
    assert record["tokens"] == 48 and record["norm"] == "recomputed"  # 4 windows of the example's 12 positions
    assert record["modules"]["final_norm"] == ["final"]
    assert record["modules"]["head"] == "out (linear, weight out.weight, bias out.bias)"
    assert record["layers"][-1]["kl"] == pytest.approx(0, abs=1e-6)
    code, out, err = cli("lens", "hf:gpt2", "--set", "n_layer=3", "--frozen-norm", "--eval-tokens", "20")
    assert code == 0, err
    assert "GPT2LMHeadModel" in out and "transformer.h.2" in out and "final norm: FROZEN" in out
    assert "modules: final norm transformer.ln_f; head lm_head" in out


@pytest.mark.parametrize("argv, message", [
    (["nowhere"], "neither a run directory nor a transformer model"),
    (["hf:gpt2", "--layers", "2"], "--layers applies to built-in models only"),
    (["hf:gpt2", "--set", "n_layers_typo=2"], "has no field 'n_layers_typo'"),
    (["hf:gpt2", "--tuned"], "give a run directory"),
])
def test_cli_lens_bad_traced_targets_are_one_line(cli, argv, message):
    code, out, err = cli("lens", *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""


BROKEN = CALLABLE + '''

class Scaled(Model):
    def __init__(self, by):
        super().__init__()
        self.by = by
    def forward(self, ids):
        return super().forward(ids) * self.by

class Narrow(Model):
    def forward(self, ids):
        return super().forward(ids)[..., :3]

def on_meta():
    with torch.device("meta"):
        return Model(), (torch.zeros(1, 12, dtype=torch.long),)

def nan_logits():
    return Scaled(float("nan")), (torch.zeros(1, 12, dtype=torch.long),)

def inf_logits():
    return Scaled(float("inf")), (torch.zeros(1, 12, dtype=torch.long),)

def narrow_head():
    return Narrow(), (torch.zeros(1, 12, dtype=torch.long),)
'''


@pytest.mark.parametrize("name, message", [
    ("on_meta", "weights are on the meta device"),
    ("nan_logits", "logits are not finite (NaN or inf)"),
    ("inf_logits", "logits are not finite (NaN or inf)"),
    ("narrow_head", "logits score 3 tokens but the input holds token id"),
])
def test_cli_lens_on_a_broken_callable_is_one_line(cli, tmp_path, name, message):
    """Found by a hostile round: each of these ended in a traceback (meta: torch's copy error; NaN: allclose's
    negative tolerance; a head narrower than the ids: gather out of bounds) or, for inf, in a wrong reason."""
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    code, out, err = cli("lens", f"{path}:{name}")
    assert code == 2 and message in err and err.count("\n") == 1 and out == "", err


def test_cli_lens_refuses_a_read_too_large_for_memory_before_allocating_it(cli, tmp_path):
    """`--eval-tokens 100000000` used to run for half a minute and be killed by the kernel (exit 137, no output):
    the logits of 10^8 tokens need far more than this machine has. Now one line with the estimate, at once; the
    same request on a built-in model too. (The estimate depends on the memory free, so the count is far beyond it.)"""
    path = tmp_path / "toy.py"
    path.write_text(CALLABLE)
    for target in (f"{path}:make", "tiny"):
        code, out, err = cli("lens", target, "--eval-tokens", str(10**12))
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "GiB for its logits, more than the" in err and "lower --eval-tokens" in err


def test_cli_lens_on_a_hugging_face_folder_reslab_does_not_convert(cli, tmp_path):
    model = hf_model("gemma2")  # not among reslab.interop's families: loaded with transformers, read traced
    model.save_pretrained(tmp_path / "gemma2")
    code, out, err = cli("lens", tmp_path / "gemma2", "--eval-tokens", "30", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert "loaded with transformers" in record["target"] and record["modules"]["final_norm"] == ["model.norm"]
    ids = torch.randint(0, 128, (31,), generator=torch.Generator().manual_seed(0))  # the CLI's ids at --seed 0
    expected = reslab.lens(model, ids)
    assert [row["loss"] for row in record["layers"]] == pytest.approx(expected.loss, abs=1e-5)
