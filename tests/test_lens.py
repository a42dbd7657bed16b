"""reslab lens: the logit lens at every residual site, the decomposition of the final stream, the CLI, and the
cross-check against TransformerLens on GPT-2."""

import json

import pytest
import torch

import reslab
from reslab.errors import ReslabError
from reslab.lens import decompose
from reslab.residual import SCHEMES

TINY = {"layers": 2, "width": 32, "heads": 2, "context": 16, "vocab_size": 40}
# decomposed: a sum of the writes, or (connections across depth with fixed coefficients) a measured combination
ADDITIVE = ["pre", "sandwich", "rezero", "layerscale", "add", "value-residual", "olmo2", "completep",
            "scales", "x0", "unet", "long-skip", "value-embed", "backout", "denseformer", "speedrun"]
NOT_ADDITIVE = ["post", "deepnorm", "none", "post-none", "article-edit", "hc", "mhc", "attnres", "laurel", "mix-ln",
                "mudd"]


def tiny_model(name="gpt", residual="pre", **overrides):
    torch.manual_seed(0)
    extra = {"kv_heads": 1} if name == "llama" else {}
    if residual == "rezero":
        extra["residual_options"] = {"rezero_init": 0.5}  # alpha = 0 would make every write zero
    model = reslab.build_model(name, residual=residual, **TINY, **extra, **overrides)
    perturb(model)
    return model


@torch.no_grad()
def perturb(model):
    """Norm gains and biases away from 1 and 0, so the frozen-scale algebra is exercised, not bypassed."""
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.add_(0.2 * torch.randn_like(param))


def tokens(batch=2, seq=12, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("residual", list(SCHEMES))
def test_lens_runs_for_every_scheme_and_its_last_entry_is_the_output(residual):
    model = tiny_model("gpt", residual)
    ids = tokens()
    result = reslab.lens(model, ids, keep_logits=True)
    assert result.names == ["embed", "0.attn", "0.ffn", "1.attn", "1.ffn"]
    assert result.per_position["loss"].shape == (5, 2, 11) and result.tokens == 22
    output = model(ids).logits[:, :-1]
    assert torch.allclose(result.logits[-1], output, atol=1e-6, rtol=0)
    assert result.kl[-1] == pytest.approx(0.0, abs=1e-6) and result.agreement[-1] == 1.0
    expected_loss = torch.nn.functional.cross_entropy(output.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert result.loss[-1] == pytest.approx(expected_loss, abs=1e-5)
    assert all(torch.isfinite(v).all() for v in result.per_position.values())
    assert min(result.kl) >= -1e-6 and not torch.equal(result.logits[0], result.logits[-1])
    assert (result.decomposition is None) == (residual not in ADDITIVE) == (result.refused is not None)


def test_multistream_lens_reduces_the_widened_stream_with_the_models_adapter():
    model = tiny_model("gpt", "hc", residual_options={"streams": 3})
    result = reslab.lens(model, tokens(), keep_logits=True)
    assert "model.stream.reduce" in result.stream and "ParallelStreams" in result.stream
    # the embedding entry reads the n copies summed: head(norm(3 e)), not head(norm(e))
    with torch.no_grad():
        ids = tokens()
        e = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
        expected = model.head(model.norm(3 * e))[:, :-1]
    assert torch.allclose(result.logits[0], expected, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_decomposition_sums_to_the_models_logit_for_pre_ln(name):
    model = tiny_model(name, "pre", **({"bias": True} if name == "gpt" else {}))
    ids = tokens()
    parts = decompose(model, ids)
    assert parts.names[0] == "embed" and len(parts.names) == 5
    assert parts.norm == ("layernorm" if name == "gpt" else "rmsnorm")
    logits = model(ids).logits[:, :-1]
    target = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(parts.target_logit, target)
    assert torch.allclose(parts.contributions.sum(0) + parts.bias, target, atol=1e-4, rtol=0)
    assert parts.sum_error < 1e-4 and parts.stream_error < 1e-5
    if name == "gpt":  # LayerNorm with a bias: the bias term is really there
        assert parts.bias.abs().max() > 1e-3
    else:
        assert torch.equal(parts.bias, torch.zeros_like(parts.bias))
    assert (parts.contributions.abs().flatten(1).amax(1) > 1e-4).all()  # every component writes something


@pytest.mark.parametrize("residual", ADDITIVE)
def test_decomposition_sums_for_every_additive_scheme(residual):
    model = tiny_model("llama", residual)
    parts = decompose(model, tokens())
    assert parts.sum_error < 1e-4 and parts.stream_error < 1e-4
    assert parts.writes.shape == (5, 2, 12, TINY["width"])


@pytest.mark.parametrize("residual", NOT_ADDITIVE)
def test_decomposition_is_refused_in_one_line_for_schemes_whose_stream_is_not_a_sum(residual):
    model = tiny_model("gpt", residual)
    with pytest.raises(ReslabError) as error:
        decompose(model, tokens())
    message = str(error.value)
    assert "\n" not in message and repr(residual) in message and "not" in message
    result = reslab.lens(model, tokens())
    assert result.refused == message and result.decomposition is None
    assert "decomposition_refused" in json.loads(json.dumps(result.to_dict()))


def test_bad_tokens_are_one_line_errors():
    model = tiny_model()
    with pytest.raises(ReslabError, match="at least 2 tokens"):
        reslab.lens(model, [3])
    with pytest.raises(ReslabError, match="integer token ids"):
        reslab.lens(model, torch.zeros(2, 3))
    with pytest.raises(ReslabError, match="no 'stream'"):
        reslab.lens(torch.nn.Linear(2, 2), [1, 2])


def test_the_probe_slot_is_restored_after_the_lens():
    model = tiny_model()
    sentinel = object()
    sites = [site for _, _, site in model.residual_sites()]
    for site in sites:
        site.probe = sentinel
    sites[0].probe = None
    model.train()
    reslab.lens(model, tokens())
    assert sites[0].probe is None and all(site.probe is sentinel for site in sites[1:]) and model.training
    assert not any(site._forward_hooks or site._forward_pre_hooks for site in sites)


def test_tuned_lens_starts_as_the_logit_lens_and_fitting_lowers_its_kl():
    from reslab.lens.tuned import TunedLens, fit_tuned_lens

    model = tiny_model("llama", "pre")
    ids = tokens(batch=4, seq=16, seed=5)
    untrained = reslab.lens(model, ids, tuned=TunedLens(TINY["width"], 4))
    assert untrained.tuned["kl"] == pytest.approx(untrained.kl, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    tuned, losses = fit_tuned_lens(model, lambda: torch.randint(0, 40, (4, 16), generator=generator), steps=30,
                                   lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    fitted = reslab.lens(model, ids, tuned=tuned)
    assert sum(fitted.tuned["kl"][:-1]) < 0.9 * sum(fitted.kl[:-1])  # on tokens it was not fitted on
    assert fitted.tuned["kl"][-1] == fitted.kl[-1] and fitted.rows()[0]["tuned_kl"] == fitted.tuned["kl"][0]


# --- cross-check against TransformerLens on GPT-2 (random weights from a tiny GPT2Config; nothing downloaded) --------


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=16, vocab_size=50,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                     bos_token_id=0, eos_token_id=0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # LN gains and all biases away from their init, so folding and biases are exercised
        for name, param in hf_model.named_parameters():
            if param.dim() == 1 or name.endswith(".bias"):
                param.add_(0.3 * torch.randn_like(param))
    return hf_model


def hooked_gpt2(hf_model):
    """TransformerLens' HookedTransformer from an in-memory HF GPT-2, its config given explicitly (no download), with
    TransformerLens' default processing (LN weights folded, writing weights centred) but an uncentred unembedding,
    so its logits are the model's own."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head,
                                  d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size,
                                  act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
                                  original_architecture="GPT2LMHeadModel", default_prepend_bos=False)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), fold_ln=True,
                                      center_writing_weights=True, center_unembed=False, fold_value_biases=True)
    return model.eval()


def test_lens_and_decomposition_match_transformer_lens_on_gpt2():
    hf_model = tiny_gpt2()
    from reslab.interop import from_hf

    model = from_hf(hf_model)
    hooked = hooked_gpt2(hf_model)
    ids = tokens(batch=2, seq=10, vocab=50, seed=3)
    targets = tokens(batch=2, seq=10, vocab=50, seed=4)
    with torch.no_grad():
        tl_logits, cache = hooked.run_with_cache(ids)
        assert torch.allclose(tl_logits, hf_model(ids).logits, atol=1e-4)
        # logit lens: every accumulated stream (resid_pre and resid_mid of each block, then the final one), through
        # ln_final with its statistics recomputed per stream, then the unembedding (folded LN gain and bias in it)
        accumulated, labels = cache.accumulated_resid(incl_mid=True, apply_ln=True, return_labels=True)
        tl_lens = hooked.unembed(accumulated)
        # direct logit attribution of each component of the final stream, ln_final's scale frozen
        components, names = cache.decompose_resid(return_labels=True)
        tl_attrs = cache.logit_attrs(components, tokens=targets)
    result = reslab.lens(model, ids, targets, keep_logits=True)
    assert len(labels) == len(result.names) == 7
    assert torch.allclose(result.logits, tl_lens, atol=1e-4, rtol=0)
    parts = result.decomposition
    assert names[:2] == ["embed", "pos_embed"] and len(names) == len(parts.names) + 1
    tl_by_component = torch.cat([tl_attrs[:2].sum(0, keepdim=True), tl_attrs[2:]])  # reslab's embed = token + position
    assert torch.allclose(parts.contributions, tl_by_component, atol=1e-4, rtol=0)
    # TransformerLens leaves the biases out of logit_attrs (folded into b_U); reslab reports them as `bias`
    assert torch.allclose(tl_attrs.sum(0) + parts.bias, parts.target_logit, atol=1e-4, rtol=0)


# --- the command line ---------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--model", "gpt", "--layers", "2", "--width", "32", "--heads", "2", "--context", "32", "--steps", "20",
               "--batch", "4", "--warmup", "2", "--eval-interval", "10", "--eval-batches", "2", "--log-interval", "10",
               "--checkpoint-interval", "20", "--no-progress", "--no-diagnostics"]


@pytest.fixture
def trained_run(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TRAIN_FLAGS, "--data", corpus, "--out", run)
    assert code == 0, err
    return run


def test_cli_lens_on_a_trained_run(cli, trained_run, tmp_path):
    code, out, err = cli("lens", trained_run, "--prompt", "ROMEO:\nthe king and the queen", "--plot", tmp_path / "p")
    assert code == 0, err
    assert "trained 20 steps" in out and "embed" in out and "1.ffn" in out and "DLA" in out
    assert (tmp_path / "p" / "lens.png").stat().st_size > 1000
    assert (tmp_path / "p" / "contributions.png").stat().st_size > 1000
    code, out, err = cli("lens", trained_run, "--tokens", "64", "--tuned", "--tuned-steps", "5", "--tuned-batch", "2")
    assert code == 0, err
    assert "tuned lens: 5 steps" in out and "tuned KL" in out
    code, out, err = cli("lens", trained_run, "--tokens", "64", "--json")  # the run's validation split
    assert code == 0, err
    record = json.loads(out)
    assert "validation split" in record["text"] and record["tokens"] == 64
    layers = record["layers"]
    assert [row["name"] for row in layers] == ["embed", "0.attn", "0.ffn", "1.attn", "1.ffn"]
    assert layers[-1]["kl"] == pytest.approx(0, abs=1e-6) and layers[-1]["agreement"] == 1.0
    assert record["decomposition"]["sum_error"] < 1e-4
    assert layers[-1]["loss"] < layers[0]["loss"]  # 20 steps already teach the stream something the embedding lacks


def test_cli_lens_on_a_built_in_model(cli):
    code, out, err = cli("lens", "llama", "--residual", "hc", "--layers", "2", "--width", "32", "--heads", "2",
                         "--kv-heads", "1", "--tokens", "20")
    assert code == 0, err
    assert "random weights" in out and "model.stream.reduce" in out and "decomposition refused" in out
    assert out.count("\n") >= 8
    again = cli("lens", "gpt", "--layers", "1", "--json")[1], cli("lens", "gpt", "--layers", "1", "--json")[1]
    assert again[0] == again[1]  # --seed fixes the random weights and ids
    assert again[0] != cli("lens", "gpt", "--layers", "1", "--json", "--seed", "1")[1]


@pytest.mark.parametrize("argv, message", [
    (["nowhere"], "neither a run directory nor a transformer model"),
    (["gpt", "--tokens", "0"], "--tokens"),
    (["gpt", "--prompt", "a"], "at least 2"),
    (["gpt", "--prompt", "ab", "--data", "x.txt"], "choose one"),
    (["gpt", "--model", "llama"], "drop --model"),
    (["gpt", "--tuned"], "give a run directory"),
    (["gpt", "--prompt", "".join(chr(0x4e00 + i) for i in range(100))], "distinct characters"),
])
def test_cli_lens_bad_input_is_one_line(cli, argv, message):
    code, out, err = cli("lens", *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""


def test_cli_lens_refuses_model_flags_on_a_run(cli, trained_run):
    code, _, err = cli("lens", trained_run, "--layers", "3")
    assert code == 2 and "drop --layers" in err and err.count("\n") == 1


@pytest.mark.parametrize("first", ["import reslab", "from reslab.lens import decompose", "import reslab.lens.tuned"])
def test_reslab_lens_is_callable_whatever_was_imported_first(first):
    import subprocess
    import sys

    code = (f"{first}\nimport reslab, torch\nimport reslab.lens.commands\n"
            "m = reslab.build_model('gpt', layers=1, width=16, heads=2, vocab_size=20)\n"
            "print(reslab.lens(m, [1, 2, 3]).names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['embed', '0.attn', '0.ffn']"


def test_the_lens_library_never_imports_the_cli():
    import ast
    from pathlib import Path

    package = Path(reslab.__file__).parent / "lens"
    for path in package.glob("*.py"):
        if path.name == "commands.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith(("reslab.cli", "reslab.train.commands")) for n in names), path.name


def test_reproduce_refine_not_replace_quick(cli, corpus, tmp_path):
    code, out, err = cli("reproduce", "refine-not-replace", "--quick", "--json", "--jobs", "1", "--data", corpus,
                         "--out", tmp_path / "out")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["numbers"]) == {f"{s}-L{d}" for s in ("pre", "none", "post") for d in (2, 4)}
    assert ("-> AGREES" in result["verdict"]) == result["agrees"]
    for key, value in result["numbers"].items():
        assert len(value["block_losses"]) == int(key.rsplit("L", 1)[1]) and -1 <= value["survival"] <= 1
    # the last block's lens loss is the trained model's own validation loss on the same windows
    from reslab.lens.inputs import run_input

    given = run_input(tmp_path / "out" / "runs" / "pre-L4-s0", None, None, 512, torch.device("cpu"))
    with torch.no_grad():
        logits = given.model(given.inputs).logits
    own = torch.nn.functional.cross_entropy(logits.flatten(0, 1), given.targets.flatten()).item()
    assert result["numbers"]["pre-L4"]["block_losses"][-1] == pytest.approx(own, abs=1e-3)
    # the ablation report gains a lens panel from the runs' checkpoints, beside its own plots
    code, _, err = cli("report", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "plots" / "lens.png").stat().st_size > 10_000
    assert "Logit lens by block" in (tmp_path / "out" / "report.html").read_text()
    from reslab.lens.ablation import block_losses

    losses = block_losses(tmp_path / "out" / "runs" / "pre-L4-s0", tokens=512)
    assert len(losses) == 5 and losses[1:] == pytest.approx(result["numbers"]["pre-L4"]["block_losses"], abs=1e-3)


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[-1, 2, 3]]), "outside the model's vocabulary"),
    (torch.tensor([[1, 2, 30]]), "outside the model's vocabulary"),
    (torch.zeros(1, 40, dtype=torch.long), "more than the model's context"),
    (torch.zeros(1, 4, dtype=torch.long, device="meta"), "not meta tensors"),
])
def test_lens_api_refuses_ids_the_model_cannot_read(tokens, message):
    model = reslab.build_model("gpt", layers=1, width=32, heads=2, context=16, vocab_size=11)
    with pytest.raises(reslab.ReslabError, match=message):
        reslab.lens(model, tokens)
