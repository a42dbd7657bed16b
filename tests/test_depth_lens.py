"""The lens on every connection across depth: the logit lens reads each one; the final stream is decomposed into the
embedding's and every write's contribution where the coefficients are fixed (measured, then checked against the
model's own final stream and logit), and refused in one line where they are computed from the stream."""

import pytest
import torch

import reslab
from reslab.lens import decompose, lens
from reslab.registry import load
from reslab.residual.depth.base import Connection, Recipe

CONNECTIONS = [name for name in reslab.list_schemes()
               if isinstance(load("residual scheme", name), type)
               and issubclass(load("residual scheme", name), (Connection, Recipe))]


def build(model: str, residual: str, **options):
    torch.manual_seed(0)
    built = reslab.build_model(model, width=32, heads=2, layers=4, vocab_size=65, context=16, residual=residual,
                               residual_options=options)
    with torch.no_grad():  # every learned coefficient away from its init, so a misplaced one shows
        generator = torch.Generator().manual_seed(1)
        for name, parameter in built.named_parameters():
            if "connections" in name or name.startswith("stream."):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return built


def tokens() -> torch.Tensor:
    return torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(2))


def test_every_connection_is_covered():
    assert {"scales", "x0", "unet", "long-skip", "value-embed", "backout", "denseformer", "mudd",
            "speedrun"} <= set(CONNECTIONS)


@pytest.mark.parametrize("name", CONNECTIONS)
def test_the_logit_lens_reads_every_connection(name):
    model = build("gpt", name)
    result = lens(model, tokens())
    assert len(result.loss) == 1 + 2 * 4
    assert result.kl[-1] == pytest.approx(0.0, abs=1e-5) and result.agreement[-1] == 1.0  # the last entry: the output
    assert all(torch.isfinite(torch.tensor(result.loss)))


@pytest.mark.parametrize("name", CONNECTIONS)
def test_a_fixed_coefficient_connection_is_decomposed_exactly_else_refused(name):
    model = build("llama", name)
    static = all(c.additive or c.static for _, _, site in model.residual_sites() for c in site.connections.values())
    if not static:
        with pytest.raises(reslab.ReslabError, match=r"^connection '[\w-]+' \(.*\) computes its coefficients from the "
                                                     r"stream[^\n]*$"):
            decompose(model, tokens())
        return
    result = decompose(model, tokens())
    assert result.stream_error < 1e-5, result.stream_error  # the weighted components add up to the final stream
    assert result.sum_error < 1e-4, result.sum_error  # and their contributions to the model's logit
    if model.blocks[0].attn_residual.connections and not all(
            c.additive for c in model.blocks[0].attn_residual.connections.values()):
        assert result.coefficients is not None and len(result.coefficients) == 1 + 2 * 4


def test_the_measured_coefficients_are_the_x0_weights():
    """x_L = e (1 + c_0 + c_1 + ...) + the writes: the embedding's coefficient is 1 + the sum of the x0 weights."""
    model = build("gpt", "x0")
    c = [block.attn_residual.connections["x0"].coefficient.item() for block in model.blocks]
    result = decompose(model, tokens())
    assert result.coefficients[0] == pytest.approx(1 + sum(c), abs=1e-5)
    assert result.coefficients[1:] == pytest.approx([1.0] * 8, abs=1e-6)


def test_a_gated_x0_is_refused_in_one_line_and_the_lens_says_why():
    model = build("gpt", "x0", x0_gated=True)
    result = lens(model, tokens())
    assert result.decomposition is None and "'x0'" in result.refused and "\n" not in result.refused


@pytest.mark.parametrize("residual", ["sandwich+x0", "layerscale+long-skip", "rezero+unet"])
def test_coefficients_are_measured_only_where_the_write_is_the_sublayers_output(residual):
    """sandwich normalises each write, layerscale and rezero scale it: the sublayer's output is not the write, so a
    measured coefficient would be wrong; refused in one line (the logit lens still runs)."""
    model = build("gpt", residual)
    result = lens(model, tokens())
    assert result.decomposition is None and "on pre or add only" in result.refused and "\n" not in result.refused
