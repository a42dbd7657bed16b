"""DenseFormer's depth-weighted average (`--residual denseformer`): parity with the reference code (epfml/DenseFormer
@c99a623 `DWAModules`, vendored unmodified in tests/reference_code/denseformer/) in values and gradients, for several
dilation x period choices, driven both by toy blocks and by a whole reslab model; the identity init (equal to `pre`);
every transformer's forward and backward; the logged depth-weight matrix; bad options refused in one line."""

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import reslab
from reslab.errors import ReslabError
from reslab.nn import make_norm
from reslab.residual import SiteSpec, get_scheme
from reslab.residual.depth.base import DepthStream, block_output

REFERENCE = Path(__file__).parent / "reference_code" / "denseformer" / "denseformer.py"
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
WIDTH, LAYERS = 16, 6
SHAPES = [(1, 1), (2, 1), (1, 2), (2, 3), (3, 2), (4, 5)]  # (dilation k, period p), the paper's "k x p"
SMALL = {"width": 32, "heads": 2, "layers": 4, "vocab_size": 65}


def reference_dwa(layers: int, dilation: int, period: int, dtype: torch.dtype):
    """The reference's `DWAModules` for `layers` blocks, with random weights (not its identity init)."""
    spec = importlib.util.spec_from_file_location("denseformer_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(1)
    dwa = module.DWAModules(layers, dilation, period).to(dtype)
    with torch.no_grad():
        for linear in dwa.alphas:
            if linear is not None:
                linear.weight.copy_(torch.randn_like(linear.weight) * 0.5)
    return dwa


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """The reference builds its accumulator slices with `torch.Tensor()`, of the default dtype: in float64 it needs
    float64 as the default (run as it is, not edited)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def copy_weights(reference, connections) -> None:
    """Each reference DWA's weights into the reslab connection after the same block; both must have one or neither."""
    for layer, (linear, connection) in enumerate(zip(reference.alphas, connections, strict=True)):
        assert (linear is None) == (connection.alpha is None), f"block {layer}: DWA present in one only"
        if linear is not None:
            assert connection.alpha.shape == linear.weight.view(-1).shape, f"block {layer}: sources differ"
            with torch.no_grad():
                connection.alpha.copy_(linear.weight.view(-1))


def site_connections(layers: int, dtype: torch.dtype, **options) -> list:
    """The denseformer connection at each block's last sublayer, built alone from its composed site."""
    scheme = get_scheme("denseformer")
    sites = [scheme(SiteSpec(layer, 1, layers, WIDTH, make_norm("layernorm"), options)) for layer in range(layers)]
    return [site.to(dtype).connections["denseformer"] for site in sites]


def max_error(ours, theirs) -> float:
    """max |a - b| / (1 + |b|) over every entry: the tolerance is both absolute and relative (torch.testing's
    atol = rtol). fp32 gradients of order 1 that sum 160 products in two orders differ by about 5e-7."""
    return max(((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(ours, theirs, strict=True))


def record(name: str, error: float) -> None:
    print(f"{name}: max |reslab - reference| / (1 + |reference|) = {error:.3g}")  # the figures, with -s


# --- parity, driven by toy blocks -----------------------------------------------------------------------------------
def toy_blocks(layers: int, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [(torch.randn(WIDTH, WIDTH, dtype=dtype) / WIDTH ** 0.5).requires_grad_() for _ in range(layers)]


def block(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A stand-in block with its own residual: `X_{i+1} = Y_i + tanh(Y_i W_i)`."""
    return y + torch.tanh(y @ weight)


def run_reslab(x0, weights, connections) -> list[torch.Tensor]:
    """What the composed site does after each block's last sublayer: save the raw output, then `leave`."""
    stream, outputs = DepthStream(x0, x0, None, {}), []
    for layer, (weight, connection) in enumerate(zip(weights, connections, strict=True)):
        raw = block(stream.x, weight)
        after = stream._replace(x=raw).save(block_output(layer), raw)
        stream = connection.leave(stream, after)
        assert stream.saved[block_output(layer)] is raw  # the raw output stays X_{i+1}
        outputs.append(stream.x)
    return outputs


def run_reference(x0, weights, reference) -> list[torch.Tensor]:
    """The reference's README loop: `init_accumulators(x)`, then `x = dwa(block(x), block_idx=i)`."""
    with default_dtype(x0.dtype):
        reference.init_accumulators(x0)
        y, outputs = x0, []
        for layer, weight in enumerate(weights):
            y = reference(block(y, weight), block_idx=layer)
            outputs.append(y)
    return outputs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dilation, period", SHAPES)
def test_parity_with_reference_driven_by_toy_blocks(dilation, period, dtype):
    reference = reference_dwa(LAYERS, dilation, period, dtype)
    connections = site_connections(LAYERS, dtype, denseformer_dilation=dilation, denseformer_period=period)
    copy_weights(reference, connections)
    weights = toy_blocks(LAYERS, dtype)
    x0 = torch.randn(2, 5, WIDTH, dtype=dtype, requires_grad=True)
    ours, theirs = run_reslab(x0, weights, connections), run_reference(x0, weights, reference)
    error = max_error(ours, theirs)
    record(f"toy blocks, values, {dtype}", error)
    assert error <= TOL[dtype]
    projection = torch.randn_like(ours[-1]) / ours[-1].numel() ** 0.5  # gradients of order 1
    ours_alpha = [c.alpha for c in connections if c.alpha is not None]
    theirs_alpha = [linear.weight for linear in reference.alphas if linear is not None]
    grads = [torch.autograd.grad((out[-1] * projection).sum(), [x0, *weights, *alphas])
             for out, alphas in ((ours, ours_alpha), (theirs, theirs_alpha))]
    error = max_error(grads[0], [g.view(-1) if g.dim() == 2 and g.shape[0] == 1 else g for g in grads[1]])
    record(f"toy blocks, gradients, {dtype}", error)
    assert error <= TOL[dtype]
    assert all(g.abs().max() > 0 for g in grads[0][:2]), "a gradient that is zero proves nothing"


@pytest.mark.parametrize("dilation, period", SHAPES)
def test_identity_init_is_the_references(dilation, period):
    """Fresh weights equal the reference's `_init_weights` (1 on the current block's output, 0 elsewhere)."""
    module = reference_dwa(LAYERS, dilation, period, torch.float32)
    module._init_weights()
    connections = site_connections(LAYERS, torch.float32, denseformer_dilation=dilation, denseformer_period=period)
    for linear, connection in zip(module.alphas, connections, strict=True):
        assert (linear is None and connection.alpha is None) or torch.equal(linear.weight.view(-1), connection.alpha)


def test_another_connections_change_at_the_block_end_is_kept():
    """If an earlier connection's `leave` changed the stream, the average replaces the raw output under it only."""
    connection = site_connections(2, torch.float64)[1]
    with torch.no_grad():
        connection.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x0, x1, x2, delta = torch.randn(4, 2, 3, WIDTH, dtype=torch.float64)
    stream = DepthStream(x1, x0, None, {block_output(0): x1})
    after = stream._replace(x=x2 + delta).save(block_output(1), x2)
    torch.testing.assert_close(connection.leave(stream, after).x, 0.5 * x0 - x1 + 2 * x2 + delta)


# --- parity inside a whole reslab model -----------------------------------------------------------------------------
def capture_block_ends(model) -> list[DepthStream]:
    """The stream leaving each block (after its connections), through forward hooks on the last sublayer's site."""
    captured: list[DepthStream] = []
    last = {layer: site for layer, _, site in model.residual_sites()}  # sites come in order: the last one wins
    for site in last.values():
        site.register_forward_hook(lambda module, args, out: captured.append(out))
    return captured


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dilation, period", [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_parity_with_reference_in_a_gpt(dilation, period, dtype):
    options = {"denseformer_dilation": dilation, "denseformer_period": period}
    torch.manual_seed(0)
    model = reslab.build_model("gpt", **{**SMALL, "layers": LAYERS}, residual="denseformer",
                               residual_options=options).to(dtype)
    reference = reference_dwa(LAYERS, dilation, period, dtype)
    connections = [site.connections["denseformer"] for _, index, site in model.residual_sites() if index == 1]
    copy_weights(reference, connections)
    captured = capture_block_ends(model)
    model(torch.randint(0, 65, (2, 8)))
    final = captured[-1]
    raw = [final.saved[block_output(layer)] for layer in range(LAYERS)]  # X_1..X_L, as the blocks computed them
    with default_dtype(dtype):
        reference.init_accumulators(final.x0)
        theirs = [reference(x, block_idx=layer) for layer, x in enumerate(raw)]
    error = max_error([stream.x for stream in captured], theirs)
    record(f"gpt, values, {dtype}", error)
    assert error <= TOL[dtype]
    # backward of a random projection of the last block's stream, w.r.t. every weight of the model (the earlier DWAs'
    # included, through the raw outputs) and the last DWA's weights, reslab's or the reference's
    assert connections[-1].alpha is not None and reference.alphas[-1] is not None
    projection = torch.randn_like(final.x) / final.x.numel() ** 0.5
    shared = [p for p in model.parameters() if p is not connections[-1].alpha]
    ours = gradients((final.x * projection).sum(), [*shared, connections[-1].alpha], retain_graph=True)
    theirs = gradients((theirs[-1] * projection).sum(), [*shared, reference.alphas[-1].weight])
    error = max_error(ours, [g.view(-1) if g.shape != o.shape else g for g, o in zip(theirs, ours)])
    record(f"gpt, gradients, {dtype}", error)
    assert error <= TOL[dtype]
    assert ours[-1].abs().max() > 0 and sum(g.abs().sum() > 0 for g in ours) > len(ours) // 2


def gradients(loss: torch.Tensor, inputs: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d input for each input, zeros for those it does not reach (the head, the final norm)."""
    found = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]


# --- the model: identity init, every transformer, the logged depth-weight matrix ------------------------------------
@pytest.mark.parametrize("model", ["tiny", "gpt", "llama", "deepseek"])
def test_identity_init_equals_pre_and_trains(model):
    idx = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    pre = reslab.build_model(model, **SMALL, residual="pre")
    torch.manual_seed(0)
    dense = reslab.build_model(model, **SMALL, residual="denseformer")
    assert torch.equal(dense(idx).logits, pre(idx).logits)  # exactly: the DWAs start as the identity
    alphas = [site.connections["denseformer"].alpha for _, _, site in dense.residual_sites()]
    alphas = [alpha for alpha in alphas if alpha is not None]
    assert [alpha.detach().tolist() for alpha in alphas] == [[0.0] * n + [1.0] for n in range(1, SMALL["layers"] + 1)]
    with torch.no_grad():
        for alpha in alphas:
            alpha.add_(0.1 * torch.randn_like(alpha))
    logits = dense(idx).logits
    assert not torch.allclose(logits, pre(idx).logits)  # the weights reach the output
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in dense.parameters()]
    assert sum(g is not None for g in grads) >= len(grads) - 2  # all but a tied or unused weight or two
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert all(alpha.grad is not None and alpha.grad.abs().sum() > 0 for alpha in alphas)


def test_depth_coefficients_are_the_rows_of_the_weight_matrix():
    options = {"denseformer_dilation": 2, "denseformer_period": 3}
    model = reslab.build_model("gpt", **{**SMALL, "layers": LAYERS}, residual="denseformer", residual_options=options)
    sites = [site for _, _, site in model.residual_sites()]
    metrics = get_scheme("denseformer").scheme_metrics(sites)
    # after block 2: X_1, X_3 (odd); after block 5: X_0, X_2, X_4, X_6 (even); identity init
    assert metrics["depth_coefficients"] == {"denseformer": {"alpha": [[0.0, 1.0], [0.0, 0.0, 0.0, 1.0]],
                                                             "sources": [[1, 3], [0, 2, 4, 6]]}}
    model = reslab.build_model("gpt", **SMALL, residual="pre+x0+denseformer")
    sites = [site for _, _, site in model.residual_sites()]
    rows = get_scheme("pre+x0+denseformer").scheme_metrics(sites)["depth_coefficients"]["denseformer"]["alpha"]
    assert [len(row) for row in rows] == [2, 3, 4, 5]  # a lower-triangular matrix over X_0..X_4


# --- bad options ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"denseformer_dilation": 0}, "denseformer_dilation must be a positive integer"),
    ({"denseformer_period": -1}, "denseformer_period must be a positive integer"),
    ({"denseformer_dilation": 1.5}, "denseformer_dilation must be a positive integer"),
    ({"denseformer_period": "2"}, "denseformer_period must be a positive integer"),
    ({"denseformer_period": True}, "denseformer_period must be a positive integer"),
    ({"denseformer_stride": 2}, "has no option 'denseformer_stride'"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    for name in ("denseformer", "pre+x0+denseformer"):
        with pytest.raises(ReslabError, match=message) as caught:
            get_scheme(name).resolve_options(options)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("layers, options, message", [
    (4, {"denseformer_period": 9}, "denseformer_period 9 is larger than the model's 4 blocks"),
    (4, {"denseformer_dilation": 5}, "use a dilation in 1..4"),
    (4, {"denseformer_dilation": 4, "denseformer_period": 3}, "use a dilation in 1..3"),
])
def test_options_the_model_cannot_use_are_refused(layers, options, message):
    with pytest.raises(ReslabError, match=message) as caught:
        get_scheme("denseformer").check_model(layers, options)
    assert "\n" not in str(caught.value)
    with pytest.raises(ReslabError, match=message):
        reslab.build_model("gpt", **{**SMALL, "layers": layers}, residual="denseformer", residual_options=options)


@pytest.mark.parametrize("dilation, period", [(4, 4), (3, 3), (4, 1), (2, 2)])
def test_the_limits_themselves_are_accepted(dilation, period):
    """The last DWA after block 3 of 4 reaches X_0 when dilation <= p floor(4/p): one average with two sources."""
    options = {"denseformer_dilation": dilation, "denseformer_period": period}
    get_scheme("denseformer").check_model(4, options)
    model = reslab.build_model("gpt", **SMALL, residual="denseformer", residual_options=options)
    sources = [site.connections["denseformer"].sources for _, _, site in model.residual_sites()]
    assert max(len(s) for s in sources) >= 2


# --- through the CLI ------------------------------------------------------------------------------------------------
TRAIN = ["--model", "gpt", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1",
         "--no-progress", "--layers", "4", "--steps", "2", "--residual", "denseformer"]


@pytest.mark.parametrize("setting, named", [
    ("denseformer_period=9", "denseformer_period"), ("denseformer_dilation=0", "denseformer_dilation"),
    ("denseformer_dilation=1.5", "denseformer"), ("denseformer_dilation=5", "denseformer_dilation"),
])
def test_cli_refuses_bad_options_in_one_line(cli, corpus, tmp_path, setting, named):
    code, _, err = cli("train", *TRAIN, "--set", setting, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_trains_and_logs_the_depth_weights(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", *TRAIN, "--set", "denseformer_period=2", "--log-interval", "1", "--data", corpus,
                       "--out", run)
    assert code == 0, err
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [m["depth_coefficients"]["denseformer"]["alpha"] for m in logged if "depth_coefficients" in m]
    assert rows and [len(row) for row in rows[-1]] == [3, 5]  # after blocks 1 and 3: X_0..X_2, X_0..X_4
    assert rows[-1] != [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0]]  # trained away from the identity
