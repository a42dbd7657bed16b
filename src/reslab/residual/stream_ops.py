"""The stream operations of the multi-stream schemes, on streams laid out streams first: `H` is `(n, batch, seq, D)`.

A site reads `h = read @ H`, and updates `H' = stream_mix @ H + write (x) F(h)`. With the streams first, static
weights make each of these one matrix product over all tokens at once (`(n + 1) x n` by `n x (batch seq D)`), which
CPU BLAS runs at memory speed; per-token weights (dynamic HC, mHC) become n fused multiply-adds of a weight per
token and stream against a whole stream.

Two implementations of the same formula:
- plain ops (`read_streams`, `mix_streams`, `write_streams`): matmuls and einsums that the audit's tracer reads as a
  stream mix and an add, and that torch.compile and autocast handle themselves;
- fused autograd Functions (`read_and_mix`, `write_into`), used otherwise: the read and the mix are one matrix
  product (static) or one batched matmul over tokens (per-token weights), and one Function, so the stream's
  gradient comes out of one place instead of being summed by autograd from two readers; the write is one fused
  multiply-add that passes the stream's gradient through untouched and saves nothing of the width n x D.
`tests/test_multistream_fused.py` checks both against the formulas, forward and gradients.
"""

from __future__ import annotations

import functools

import torch

from reslab._torch_compat import (
    functorch_transforms_active,
    is_batched_gradient,
    torch_function_mode_enabled,
    view_base,
)


def fused_path(streams: torch.Tensor) -> bool:
    """Use the fused Functions? Not on the meta device or under a TorchFunctionMode (the audit's tracer reads the
    plain ops), not while torch.compile traces (it fuses the plain ops itself), not under torch.func transforms
    (grad, vmap: the Functions have no functorch rules), and only for float32/float64 streams. Under autocast they
    run in the stream's precision (`stream_precision`): the stream stays fp32, as pre-LN's residual add does."""
    return (streams.device.type != "meta" and not torch_function_mode_enabled()
            and not functorch_transforms_active()
            and not torch.compiler.is_compiling() and streams.dtype in (torch.float32, torch.float64))


def fusable_without_autocast(streams: torch.Tensor, *others: torch.Tensor) -> bool:
    """`fused_path`, and only with autocast off and one dtype throughout: for the fused Functions (gated-hc's, laurel's)
    whose plain ops keep autocast's precisions (gated-hc's gate projections in low precision, as Qwen4-Exp runs them;
    laurel's fx in bf16 beside an fp32 stream), which a Function in the stream's precision would change."""
    return (fused_path(streams) and not torch.is_autocast_enabled(streams.device.type)
            and all(other.dtype == streams.dtype for other in others))


def stream_precision(streams: torch.Tensor):
    """Autocast off for the fused stream update (whose inputs are first cast to the stream's dtype)."""
    return torch.autocast(streams.device.type, enabled=False)


def backward_in_stream_precision(backward):
    """A fused Function's `backward` with autocast off, as its forward ran: a training loop that calls
    `loss.backward()` inside its `torch.autocast` block would otherwise run the hand-written backward's matmuls on
    fp32 saved tensors and fp32 gradients under autocast, which casts one side to bf16 and fails on the mix."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next((grad.device.type for grad in grads if isinstance(grad, torch.Tensor)), None)
        if device is None:  # no gradient at all (possible only with set_materialize_grads(False))
            return backward(ctx, *grads)
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return run


# --- plain ops ------------------------------------------------------------------------------------------------
def read_streams(read: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """`sum_i read_i H_i`: (n,) or per-token (batch, seq, n) weights, (n, batch, seq, D) streams -> (batch, seq, D)."""
    if read.dim() == 1:
        return (read @ streams.flatten(1)).view(streams.shape[1:])
    return torch.einsum("btj,jbtd->btd", read, streams)


def mix_streams(stream_mix: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """`stream_mix @ H`: (n, n) or per-token (batch, seq, n, n) weights; the result has the streams' shape."""
    if stream_mix.dim() == 2:
        return (stream_mix @ streams.flatten(1)).view(streams.shape)
    return torch.einsum("btij,jbtd->ibtd", stream_mix, streams)


def write_streams(write: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """`write^T F`: the sublayer's output into every stream with its weight, (n,) or (batch, seq, n) weights and a
    (batch, seq, D) output -> (n, batch, seq, D)."""
    if write.dim() == 1:
        return torch.einsum("i,btd->ibtd", write, fx)
    return torch.einsum("bti,btd->ibtd", write, fx)


# --- fused ----------------------------------------------------------------------------------------------------
# Both run in the stream's precision: under autocast the weights (and fx) arrive in lower precision and are upcast.
def read_and_mix(read: torch.Tensor, stream_mix: torch.Tensor, streams: torch.Tensor):
    """(h, mixed) = (read_streams(read, H), mix_streams(stream_mix, H)), in one autograd Function."""
    n, *lead, width = streams.shape
    read, stream_mix = read.to(streams.dtype), stream_mix.to(streams.dtype)
    with stream_precision(streams):
        if stream_mix.dim() == 2:
            h, mixed = StaticReadMix.apply(streams.reshape(n, -1), torch.cat([read.unsqueeze(0), stream_mix]))
        else:  # per token an (n + 1) x n matrix: the read, then the stream mix
            weights = torch.cat([read.unsqueeze(-2), stream_mix], dim=-2).reshape(-1, n + 1, n)
            h, mixed = TokenReadMix.apply(streams.reshape(n, -1, width), weights)
    return h.reshape(*lead, width), mixed.reshape(n, *lead, width)


def write_into(mixed: torch.Tensor, write: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """`mixed + write_streams(write, fx)` in one autograd Function."""
    n, *lead, width = mixed.shape
    write, fx = write.to(mixed.dtype), fx.to(mixed.dtype)
    with stream_precision(mixed):
        if write.dim() == 1:
            out = StaticWrite.apply(mixed.reshape(n, -1), write, fx.reshape(-1))
        else:
            out = TokenWrite.apply(mixed.reshape(n, -1, width), write.reshape(-1, n), fx.reshape(-1, width))
    return out.reshape(mixed.shape)


class StaticReadMix(torch.autograd.Function):
    """`[h; mixed] = W H` with W = [read; stream_mix] ((n+1) x n) and H (n x tokens D): one matrix product.
    Backward, with G = [dh; dmixed] ((n+1) x tokens D): `dH = W^T G` and `dW = G H^T`, two matrix products.

    G is one matrix without a copy of dmixed: `dH` is written into rows 1..n of an (n+1)-row buffer (`spare_row`),
    and that gradient reaches the previous site's backward as its dmixed (a site's write passes the stream's gradient
    on untouched), which then only copies its dh into row 0. Where dmixed is any other tensor (the last site, a
    gradient autograd summed from several readers), G is assembled by copying. Under create_graph or batched
    gradients the backward is written in plain differentiable ops instead."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, weights: torch.Tensor):
        out = weights @ streams
        ctx.save_for_backward(streams, weights)
        return out[0], out[1:]

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_h: torch.Tensor, grad_mixed: torch.Tensor):
        streams, weights = ctx.saved_tensors
        # create_graph (double backward) and batched gradients (is_grads_batched) need ops autograd and vmap know
        plain = torch.is_grad_enabled() or is_batched_gradient(grad_mixed)
        grad_all = None if plain else with_spare_row(grad_mixed)
        if grad_all is None:
            grad_all = torch.cat([grad_h.unsqueeze(0), grad_mixed])
        else:
            grad_all[0].copy_(grad_h)
        if plain:
            return weights.t() @ grad_all, grad_all @ streams.t()
        grad_streams = spare_row(grad_all)
        torch.mm(weights.t(), grad_all, out=grad_streams)
        return grad_streams, grad_all @ streams.t()


def spare_row(like: torch.Tensor) -> torch.Tensor:
    """Rows 1..n of a new (n+1)-row buffer shaped like `like`, marked so that `with_spare_row` knows row 0 is free."""
    buffer = like.new_empty(like.shape)
    buffer._reslab_spare_row = True
    return buffer[1:]


def with_spare_row(rows: torch.Tensor) -> torch.Tensor | None:
    """The whole buffer when `rows` is exactly rows 1..n of a `spare_row` buffer (row 0 is then ours to fill)."""
    base = view_base(rows)
    if base is None or not getattr(base, "_reslab_spare_row", False) or rows.dim() != 2 or not rows.is_contiguous():
        return None
    if base.shape != (rows.shape[0] + 1, rows.shape[1]) or not base.is_contiguous():
        return None
    if rows.data_ptr() != base[1].data_ptr() or rows.dtype != base.dtype:
        return None
    return base


class StaticWrite(torch.autograd.Function):
    """`out = mixed + write (x) F`, one fused pass. Backward: `dmixed = dout` (passed on as it is), `dF = write^T dout`,
    `dwrite = dout F`."""

    @staticmethod
    def forward(ctx, mixed: torch.Tensor, write: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(write, fx)
        return torch.addr(mixed, write, fx)

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_out: torch.Tensor):
        write, fx = ctx.saved_tensors
        return grad_out, grad_out @ fx, write @ grad_out


class TokenReadMix(torch.autograd.Function):
    """Per-token weights `weights[t]` ((n+1) x n: the read, then the stream mix): `out[:, t] = weights[t] H[:, t]`,
    one batched matmul over tokens on a strided view of the streams (no copy; the result comes out token-major).
    Backward: `dH[:, t] = read[t] dh[t]^T + stream_mix[t]^T dmixed[:, t]`, `dread[t] = H[:, t] dh[t]`,
    `dstream_mix[t] = dmixed[:, t] H[:, t]^T`: four batched matmuls, no concatenated gradient."""

    @staticmethod
    def forward(ctx, streams: torch.Tensor, weights: torch.Tensor):
        out = torch.bmm(weights, streams.transpose(0, 1))  # (tokens, n + 1, D)
        ctx.save_for_backward(streams, weights)
        return out[:, 0], out[:, 1:].transpose(0, 1)

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_h: torch.Tensor, grad_mixed: torch.Tensor):
        streams, weights = ctx.saved_tensors
        by_token = streams.transpose(0, 1)  # (tokens, n, D), a view
        grad_mixed = grad_mixed.transpose(0, 1)
        grad_streams = torch.bmm(weights[:, 1:].transpose(1, 2), grad_mixed)
        grad_streams.baddbmm_(weights[:, :1].transpose(1, 2), grad_h.unsqueeze(1))
        grad_weights = torch.cat([torch.bmm(grad_h.unsqueeze(1), by_token.transpose(1, 2)),
                                  torch.bmm(grad_mixed, by_token.transpose(1, 2))], dim=1)
        return grad_streams.transpose(0, 1), grad_weights


class TokenWrite(torch.autograd.Function):
    """`out[i, t] = mixed[i, t] + write[t, i] F[t]` (write: (tokens, n)). Backward: `dmixed = dout`,
    `dF[t] = write[t] dout[:, t]`, `dwrite[t] = dout[:, t] F[t]`: two batched matmuls on a view of dout."""

    @staticmethod
    def forward(ctx, mixed: torch.Tensor, write: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(write, fx)
        return torch.addcmul(mixed, write.t().unsqueeze(-1), fx)

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_out: torch.Tensor):
        write, fx = ctx.saved_tensors
        by_token = grad_out.transpose(0, 1).contiguous()  # (tokens, n, D): a copy only after the final sum's expand
        grad_fx = torch.bmm(write.unsqueeze(1), by_token).squeeze(1)
        grad_write = torch.bmm(by_token, fx.unsqueeze(-1)).squeeze(-1)
        return by_token.transpose(0, 1), grad_write, grad_fx
