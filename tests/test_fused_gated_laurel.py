"""gated-hc and laurel run fused autograd Functions in fp32/fp64 training (`stream_ops.fused_path`) and plain ops
elsewhere (the audit's tracer, torch.compile, autocast): the two paths compute the same outputs and gradients."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import reslab


class Plain(TorchFunctionMode):
    """Any active TorchFunctionMode turns the fused Functions off (`fused_path`), as the audit's tracer does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def graph_nodes(output: torch.Tensor) -> set[str]:
    """The names of every autograd node behind `output`."""
    seen, stack, names = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(parent for parent, _ in node.next_functions)
    return names


@pytest.mark.parametrize("scheme, options, fused", [
    ("gated-hc", {"gated_hc_streams": 3, "gated_hc_rank": 5}, "FusedGatedReadBackward"),
    ("laurel", {"laurel_rank": 4}, "WeightedLowRankSumBackward"),
])
def test_the_fused_path_equals_the_plain_ops(scheme, options, fused):
    torch.manual_seed(0)
    model = reslab.build_model("gpt", residual=scheme, residual_options=options, layers=2, width=32, heads=2,
                               context=16, vocab_size=65).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # every gate, scale and map away from its init
    idx, params = torch.randint(0, 65, (2, 16)), list(model.parameters())
    out = model(idx).logits
    assert fused in graph_nodes(out)
    grad = torch.randn_like(out)
    fused_grads = torch.autograd.grad(out, params, grad)
    with Plain():
        plain_out = model(idx).logits
        assert fused not in graph_nodes(plain_out)
        plain_grads = torch.autograd.grad(plain_out, params, grad)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
