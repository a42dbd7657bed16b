"""A user's own training loop may call `loss.backward()` inside its `torch.autocast` block (the PyTorch docs advise
against it, many loops do it anyway). Every registered scheme's model must then train as it does with the backward
outside: the fused stream Functions run their hand-written backward with autocast off, as their forward ran. Before,
mhc, mhc-lite, mhc-v4 and frac failed with a dtype mismatch inside a matmul of the backward."""

import pytest
import torch
import torch.nn.functional as F

from reslab.models import build_model
from reslab.registry import SCHEMES


def gradients(model, tokens, backward_inside: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_backward_inside_autocast_gives_the_gradients_of_backward_outside(scheme):
    torch.manual_seed(0)
    model = build_model("gpt", layers=2, width=32, heads=2, context=16, vocab_size=50, residual=scheme)
    tokens = torch.randint(0, 50, (2, 16))
    outside = gradients(model, tokens, backward_inside=False)
    inside = gradients(model, tokens, backward_inside=True)
    assert outside.dtype == inside.dtype == torch.float32 and outside.abs().max() > 0
    torch.testing.assert_close(inside, outside, rtol=1e-3, atol=1e-3 * outside.abs().max().item())
