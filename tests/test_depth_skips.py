"""U-net skips, the long skip and backout (`reslab/residual/depth/skips.py`, `backout.py`): each model's logits
against the formula worked out here from the model's own blocks (which block feeds which, with which weight),
their defaults by depth, the learned weights' gradients and logged values, every transformer, and the options the
CLI refuses in one line. x-transformers' `unet_skips` is no oracle: it concatenates the skip with the stream and
projects them with a learned matrix, where these add the saved output with one scalar."""

import math

import pytest
import torch

import reslab

SMALL = {"width": 32, "heads": 2, "vocab_size": 65, "context": 16}
SIG = 1 / (1 + math.exp(1.5))  # sigmoid(-1.5), the raw -1.5 init through the sigmoid


def build(residual: str, layers: int = 4, model: str = "gpt", **options):
    torch.manual_seed(0)
    return reslab.build_model(model, **SMALL, layers=layers, residual=residual, residual_options=options).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))


def by_hand(model, skips: dict[int, tuple[int, float]], backout: tuple[int, float] | None = None) -> torch.Tensor:
    """Pre-LN logits from the model's own parts, with `skips` {destination: (source, weight)} adding the source
    block's output at the destination's start, and `backout` (block, lambda) subtracted before the final norm."""
    idx = tokens()
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
    outputs = []
    for i, block in enumerate(model.blocks):
        if i in skips:
            source, weight = skips[i]
            x = x + weight * outputs[source]
        for site, sublayer in block.sites():
            x = x + sublayer(site.norm(x))
        outputs.append(x)
    if backout is not None:
        x = x - backout[1] * outputs[backout[0]]
    return model.head(model.norm(x))


def set_parameters(model, key: str, values: dict[int, float], index: int = 0) -> None:
    """Set the connection `key`'s parameter at sublayer `index` of each block in `values` (raw value)."""
    with torch.no_grad():
        for layer, value in values.items():
            model.blocks[layer].sites()[index][0].connections[key].weight.fill_(value)


def holders(model, key: str) -> list[tuple[int, int]]:
    """(block, sublayer) of every site where connection `key` holds a parameter."""
    return [(layer, index) for layer, block in enumerate(model.blocks) for index, (site, _) in enumerate(block.sites())
            if site.connections[key].weight is not None]


def sigmoid(w: float) -> float:
    return 1 / (1 + math.exp(-w))


def check(model, expected: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, expected, rtol=0, atol=2e-5)


# --- U-net skips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, pairs", [(4, {2: 1, 3: 0}), (5, {3: 1, 4: 0}), (2, {1: 0})])
def test_unet_adds_each_first_half_output_to_its_mirror_through_a_sigmoid(layers, pairs):
    model = build("unet", layers)
    raw = {dest: 0.3 - 0.8 * k for k, dest in enumerate(pairs)}  # distinct weights: a wrong pairing shows
    set_parameters(model, "unet", raw)
    assert holders(model, "unet") == [(dest, 0) for dest in pairs]  # the odd depth's middle block gets none
    with torch.no_grad():
        check(model, by_hand(model, {dest: (src, sigmoid(raw[dest])) for dest, src in pairs.items()}))


def test_unet_at_its_default_init_is_the_sigmoid_of_minus_1_5():
    model = build("unet")
    with torch.no_grad():
        check(model, by_hand(model, {2: (1, SIG), 3: (0, SIG)}))
        assert model(tokens()).logits.sub(by_hand(model, {})).abs().max() > 1e-3  # and not pre-LN


def test_unet_without_the_sigmoid_is_record_11s_plain_weight_from_1():
    model = build("unet", unet_plain=True)
    with torch.no_grad():
        check(model, by_hand(model, {2: (1, 1.0), 3: (0, 1.0)}))
        set_parameters(model, "unet", {2: -0.25, 3: 0.6})
        check(model, by_hand(model, {2: (1, -0.25), 3: (0, 0.6)}))
    model = build("unet", unet_init=0.0, unet_plain=True)  # weight 0: pre-LN exactly
    with torch.no_grad():
        check(model, by_hand(model, {}))


# --- the long skip ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, options, source, destination", [
    (4, {}, 1, 3), (11, {}, 3, 6), (12, {}, 3, 6), (3, {}, 0, 2), (2, {}, 0, 1),
    (4, {"long_skip_from": 0, "long_skip_to": 2}, 0, 2), (4, {"long_skip_from": 0}, 0, 2),
    (4, {"long_skip_to": 1}, 0, 1), (6, {"long_skip_from": 4}, 4, 5),
])
def test_long_skip_adds_one_source_output_at_one_destination(layers, options, source, destination):
    model = build("long-skip", layers, **options)
    assert holders(model, "long_skip") == [(destination, 0)]
    with torch.no_grad():
        check(model, by_hand(model, {destination: (source, SIG)}))  # the default raw init -1.5
        set_parameters(model, "long_skip", {destination: 0.9})
        check(model, by_hand(model, {destination: (source, sigmoid(0.9))}))


# --- backout ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers, options, block", [
    (4, {}, 1), (11, {}, 7), (12, {}, 7), (2, {}, 0), (4, {"backout_from": 2}, 2), (4, {"backout_from": 0}, 0),
])
def test_backout_subtracts_one_block_output_before_the_final_norm(layers, options, block):
    model = build("backout", layers, **options)
    assert holders(model, "backout") == [(block, 1)]  # lambda lives at the block's last sublayer
    with torch.no_grad():
        check(model, by_hand(model, {}, backout=(block, 0.5)))  # backout_init 0.5 (record #40)
        set_parameters(model, "backout", {block: -0.3}, index=1)
        check(model, by_hand(model, {}, backout=(block, -0.3)))


def test_the_logit_lens_decodes_a_stream_from_before_the_backed_out_block():
    """The adapter decodes every site's stream (the logit lens): before block k's end there is nothing to back out;
    from then on lambda h_k is."""
    model = build("backout")
    stream = model.stream.enter(torch.randn(2, 16, 32), tokens())
    assert torch.equal(model.stream.reduce(stream), stream.x)
    for block in model.blocks[:2]:
        stream = block(stream)
    torch.testing.assert_close(model.stream.reduce(stream), 0.5 * stream.x, rtol=0, atol=1e-6)


# --- composed, gradients, logged values ---------------------------------------------------------------------------
def test_all_three_compose_with_x0_on_pre():
    model = build("pre+x0+unet+long-skip+backout")
    set_parameters(model, "unet", {2: 0.4, 3: -0.2})
    set_parameters(model, "long_skip", {3: 1.1})
    set_parameters(model, "backout", {1: 0.7}, index=1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn_residual.connections["x0"].coefficient.fill_(0.1)
        x0 = model.tok_emb(tokens()) + model.pos_emb(torch.arange(16))
        outputs, x = [], x0
        for i, block in enumerate(model.blocks):  # x0's enter, then unet's, then the long skip's
            x = x + 0.1 * x0
            if i == 2:
                x = x + sigmoid(0.4) * outputs[1]
            if i == 3:
                x = x + sigmoid(-0.2) * outputs[0] + sigmoid(1.1) * outputs[1]
            for site, sublayer in block.sites():
                x = x + sublayer(site.norm(x))
            outputs.append(x)
        check(model, model.head(model.norm(x - 0.7 * outputs[1])))


def test_the_weights_get_gradients_and_are_reported_as_applied():
    model = build("pre+unet+long-skip+backout").train()
    model(tokens()).logits.square().mean().backward()
    parameters = {name: p for name, p in model.named_parameters() if ".connections." in name}
    assert set(parameters) == {"blocks.2.attn_residual.connections.unet.weight",
                               "blocks.3.attn_residual.connections.unet.weight",
                               "blocks.3.attn_residual.connections.long_skip.weight",
                               "blocks.1.ffn_residual.connections.backout.weight"}
    for name, parameter in parameters.items():
        assert parameter.grad is not None and math.isfinite(parameter.grad.item()) and parameter.grad.item() != 0, name
    set_parameters(model, "unet", {2: 2.0})
    sites = [site for _, _, site in model.residual_sites()]
    found = type(sites[0]).scheme_metrics(sites)["depth_coefficients"]
    assert found["unet"]["w"] == pytest.approx([sigmoid(2.0), SIG])  # after the sigmoid, one per destination
    assert found["long-skip"]["gate"] == pytest.approx([SIG])
    assert found["backout"]["lambda"] == pytest.approx([0.5])
    plain = build("unet", unet_plain=True)
    sites = [site for _, _, site in plain.residual_sites()]
    assert type(sites[0]).scheme_metrics(sites)["depth_coefficients"] == {"unet": {"w": [1.0, 1.0]}}


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
@pytest.mark.parametrize("residual", ["unet", "long-skip", "backout"])
def test_every_transformer_builds_trains_and_backs_through_each(model, residual):
    built = build(residual, model=model).train()
    logits = built(tokens()).logits
    assert logits.shape == (2, 16, 65) and logits.isfinite().all()
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for name, p in built.named_parameters() if ".connections." in name]
    assert grads and all(g is not None and g.isfinite().all() and g.abs().item() > 0 for g in grads)


# --- refusals -----------------------------------------------------------------------------------------------------
TRAIN = ["--model", "gpt", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
         "--no-progress", "--steps", "2"]


@pytest.mark.parametrize("flags, phrase", [
    (["--residual", "long-skip", "--set", "long_skip_from=9"], "long_skip_from must be a block index in [0, 2]"),
    (["--residual", "long-skip", "--set", "long_skip_to=4"], "long_skip_to must be a block index in [1, 3]"),
    (["--residual", "long-skip", "--set", "long_skip_from=-1"], "long_skip_from must be a block index in [0, 1]"),
    (["--residual", "pre+long-skip", "--set", "long_skip_from=2", "--set", "long_skip_to=2"],
     "long_skip_from must be a block index in [0, 1] (a block before long_skip_to = 2"),
    (["--residual", "long-skip", "--set", "long_skip_from=1.5"], "got 1.5"),  # an integer option, by either check
    (["--residual", "backout", "--set", "backout_from=3"], "backout_from must be a block index in [0, 2]"),
    (["--residual", "backout", "--set", "backout_init=99.0"], "backout_init must be a number in [-10, 10]"),
    (["--residual", "unet", "--set", "unet_init=-20.0"], "unet_init must be a number in [-10, 10]"),
    (["--residual", "unet", "--layers", "1"], "connection 'unet' needs 2 or more blocks"),
    (["--residual", "long-skip", "--layers", "1"], "connection 'long-skip' needs 2 or more blocks"),
])
def test_bad_options_are_one_line_exit_2(cli, corpus, tmp_path, flags, phrase):
    layers = [] if "--layers" in flags else ["--layers", "4"]
    code, _, err = cli("train", *TRAIN, *layers, *flags, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert phrase in err, err
