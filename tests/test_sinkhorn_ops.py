"""The fused autograd Functions of `mhc-v4` (`reslab.residual.sinkhorn_ops`) and `frac` (`FracRead`) against the
plain ops they replace, differentiated by autograd: forward and every gradient in float64, gradcheck on the
Functions, and a whole site on its fused path (the default) against the same site on its plain path (under a
TorchFunctionMode, which sends every multi-stream site to its plain ops). The parity with transformers' and the
hyper-connections package's modules is in tests/test_scheme_mhc_v4.py and tests/test_scheme_frac.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from reslab.nn import make_norm
from reslab.residual import SiteSpec, get_scheme
from reslab.residual.mhc_v4 import flat_rms, v4_sinkhorn
from reslab.residual.sinkhorn_ops import rsqrt_projection, unrolled_sinkhorn

WIDTH = 16


class PlainOps(TorchFunctionMode):
    """A mode that changes nothing but is active: `stream_ops.fused_path` is then False, so sites use plain ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("iterations", [1, 2, 20])
def test_unrolled_sinkhorn_is_autograd_through_v4s_steps(iterations):
    torch.manual_seed(0)
    logits = (3 * torch.randn(7, 4, 4, dtype=torch.float64)).requires_grad_()  # (tokens, j, k)
    grad = torch.randn(7, 4, 4, dtype=torch.float64)
    expected = v4_sinkhorn(logits, iterations, 1e-3)
    expected_grad, = torch.autograd.grad(expected, logits, grad)
    tokens_last = logits.detach().permute(1, 2, 0).contiguous().requires_grad_()
    mine = unrolled_sinkhorn(tokens_last, iterations, 1e-3)
    # the incoming gradient transposed, as `mhc-v4` hands it over (comb^T by token)
    mine_grad, = torch.autograd.grad(mine, tokens_last, grad.permute(1, 2, 0))
    torch.testing.assert_close(mine.permute(2, 0, 1), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(mine_grad.permute(2, 0, 1), expected_grad, atol=1e-10, rtol=0)
    assert expected_grad.abs().max() > 1e-3  # not a vacuous comparison


def test_rsqrt_projection_is_v4s_rms_then_linear():
    torch.manual_seed(0)
    rows = (0.1 * torch.randn(9, 3 * WIDTH, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, 3 * WIDTH, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, 5, dtype=torch.float64)
    expected = F.linear(flat_rms(rows.view(9, 3, WIDTH).movedim(1, 0), 1e-2), weight)
    expected_grads = torch.autograd.grad(expected, [rows, weight], grad)
    mine = rsqrt_projection(rows, weight, 1e-2)
    mine_grads = torch.autograd.grad(mine, [rows, weight], grad.t())
    torch.testing.assert_close(mine.t(), expected, atol=1e-12, rtol=0)
    for ours, theirs in zip(mine_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_gradcheck_of_both_functions():
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: unrolled_sinkhorn(z, 5, 1e-3), (logits,))
    rows = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rsqrt_projection(x, w, 1e-3), (rows, weight))


def site_and_sublayer(scheme: str, options: dict) -> tuple[nn.Module, nn.Module]:
    """A site with every weight moved off its init (so a misplaced one shows) and a small nonlinear sublayer."""
    torch.manual_seed(1)
    site = get_scheme(scheme)(SiteSpec(1, 1, 2, WIDTH, make_norm("rmsnorm"), options)).double()
    with torch.no_grad():
        for p in site.parameters():
            p.add_(0.3 * torch.randn_like(p))
    sublayer = nn.Sequential(nn.Linear(WIDTH, 24), nn.Tanh(), nn.Linear(24, WIDTH)).double()
    return site, sublayer


def graph_names(tensor: torch.Tensor) -> set[str]:
    """The names of every autograd node behind `tensor`."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def run_site(site, sublayer, streams, plain: bool):
    """The site's output, its graph's node names, and the gradients of <out, g> for the streams and parameters."""
    x = streams.clone().requires_grad_()
    with PlainOps() if plain else torch.enable_grad():
        out = site(x, sublayer)
    params = [p for p in site.parameters()]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad((out * g).sum(), [x, *params])
    return out.detach(), graph_names(out), grads


@pytest.mark.parametrize("scheme, options, fused_node", [
    ("mhc-v4", {"mhc_v4_streams": 3, "mhc_v4_sinkhorn_iters": 6}, "UnrolledSinkhornBackward"),
    ("frac", {"frac_streams": 3, "frac_fractions": 4}, "FracReadBackward"),
    ("frac", {"frac_streams": 1, "frac_fractions": 2, "frac_tanh": False}, "FracReadBackward"),
])
def test_a_site_on_its_fused_path_matches_its_plain_path(scheme, options, fused_node):
    site, sublayer = site_and_sublayer(scheme, options)
    n = get_scheme(scheme).streams(options)
    streams = torch.randn(2, 5, n, WIDTH, dtype=torch.float64).movedim(2, 0)  # token-major, as the model keeps them
    streams = streams[0] if n == 1 else streams
    fused_out, fused_graph, fused_grads = run_site(site, sublayer, streams, plain=False)
    plain_out, plain_graph, plain_grads = run_site(site, sublayer, streams, plain=True)
    assert fused_node in fused_graph and fused_node not in plain_graph  # each path is the one meant
    torch.testing.assert_close(fused_out, plain_out, atol=1e-12, rtol=0)
    assert (fused_out - streams).abs().max() > 0.1
    for ours, theirs in zip(fused_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)
