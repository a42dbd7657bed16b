"""Fused autograd Functions for DeepSeek-V4's mHC (`mhc-v4`): its RMS-normalised projection of vec(H), and its
20-step Sinkhorn with the gradient of the unrolled iteration, each one Function instead of a chain of autograd nodes.

Both work on *channel-major* tensors, tokens last: the projection returns `(channels, tokens)` and the Sinkhorn
takes and returns `(n, n, tokens)`, so that every normalisation of the Sinkhorn reduces a short axis over long
contiguous rows (one vectorised kernel for all tokens; reducing a trailing axis of length n per token is several
times slower on CPU), and the rows of pre, post and comb are contiguous slices of the projection.

The math is V4's (transformers 5.25, modeling_deepseek_v4.py: `DeepseekV4UnweightedRMSNorm` 65-71, HyperConnection
981-990), restated in `reslab.residual.mhc_v4`; the gradients are the same formulas autograd derives step by step,
written out by hand. `tests/test_scheme_mhc_v4.py` compares both, forward and backward, with transformers' modules;
`tests/test_sinkhorn_ops.py` with autograd through the plain ops.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from reslab.residual.stream_ops import backward_in_stream_precision


def rsqrt_projection(rows: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`(weight @ (x rsqrt(mean(x^2) + eps))^T)` for (tokens, K) rows x and a (C, K) weight: (C, tokens), V4's
    `F.linear(UnweightedRMSNorm(x), fn)` transposed, in one Function (`RsqrtProjection`)."""
    return RsqrtProjection.apply(rows, weight, eps)


class RsqrtProjection(torch.autograd.Function):
    """`out = (W x^T) r^T` with `r = rsqrt(mean(x^2) + eps)` per row of x: the projection of the RMS-normalised rows
    without the normalised copy of the (tokens, K) rows (normalising after the product is the same linear map).

    Backward, with `dq = dout r` (C, tokens): `dW = dq x`, and `dx = dq^T W + c x` where `c = -<dout, out> r^2 / K`
    per row (the gradient through r: dr/dx = -r^3 x / K, dL/dr = <dout, out> / r)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        scale = torch.rsqrt(torch.linalg.vector_norm(rows, dim=-1).square_().div_(rows.shape[-1]).add_(eps))
        out = (weight @ rows.t()).mul_(scale)
        ctx.save_for_backward(rows, weight, scale, out)
        return out

    @staticmethod
    @once_differentiable  # the saved scale is used as a constant: a second derivative would be wrong
    @backward_in_stream_precision
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight, scale, out = ctx.saved_tensors
        grad_q = grad_out * scale
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            coef = (grad_out * out).sum(0).mul_(scale.square()).div_(-rows.shape[-1])
            grad_rows = torch.addcmul(grad_q.t() @ weight, coef.unsqueeze(-1), rows)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_q @ rows
        return grad_rows, grad_weight, None


def unrolled_sinkhorn(logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """V4's Sinkhorn on (n, n, tokens) logits `Z[j, k]` (j: input stream, k: output stream): `softmax_k(Z) + eps`,
    divided by its column sums (+ eps), then `iterations - 1` times rows then columns, eps in every denominator. The
    gradient is that of the unrolled iteration (`UnrolledSinkhorn`), as autograd through every step gives it."""
    return UnrolledSinkhorn.apply(logits, iterations, eps)


def normalizations(iterations: int) -> list[int]:
    """The axis each normalisation of V4's Sinkhorn sums over, in order, on (j, k, tokens) matrices: 0 (over j, the
    columns' sums), then `iterations - 1` times 1 (rows) and 0."""
    return [0] + [1, 0] * (iterations - 1)


class UnrolledSinkhorn(torch.autograd.Function):
    """V4's Sinkhorn, forward and the backward of its unrolled steps in one Function.

    Each step is `y = x / s`, `s = sum_axis(x) + eps`, whose gradient is `dx = (dy - sum_axis(dy y)) / s`; the
    softmax's is `dZ = S (dP - sum_k(dP S))`. The forward keeps every step's output y and denominator s (the
    (n, n, tokens) matrices of all steps, a few MB) and the backward walks them back in 4 kernels a step."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
        soft = torch.softmax(logits, dim=1)
        axes = normalizations(iterations)
        outputs = logits.new_empty((len(axes), *logits.shape))
        denominators = []
        current = soft + eps
        for axis, output in zip(axes, outputs.unbind(0)):
            denominators.append(current.sum(axis, keepdim=True).add_(eps))
            current = torch.div(current, denominators[-1], out=output)
        ctx.save_for_backward(soft, outputs, *denominators)
        ctx.axes = axes
        return current  # a view of the saved steps: an in-place change of it would fail autograd's version check

    @staticmethod
    @once_differentiable  # each step's saved output is used as a constant: no second derivative
    @backward_in_stream_precision
    def backward(ctx, grad: torch.Tensor):
        soft, outputs, *denominators = ctx.saved_tensors
        grad = grad.contiguous()  # it arrives transposed (comb^T by token): each step below would keep that layout
        steps = list(zip(ctx.axes, outputs.unbind(0), denominators))
        for index, (axis, output, denominator) in enumerate(reversed(steps)):
            product = (grad * output).sum(axis, keepdim=True)
            # the first step makes a new tensor (autograd's grad is not ours to change); the others work in place
            grad = (grad - product).div_(denominator) if index == 0 else grad.sub_(product).div_(denominator)
        grad_logits = soft * grad.sub_((grad * soft).sum(1, keepdim=True))
        return grad_logits, None, None
