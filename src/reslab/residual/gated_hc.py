"""Gated-residual hyper-connections, as Qwen4-Exp ships them (transformers 5.25, `qwen4_exp`).

The stream is widened to `n` copies of the embedding (`ParallelStreams`, tokens first in memory, so a token's
`n x D` values lie side by side as Qwen4-Exp's flat `[B, S, n D]` stream does). There is no stream-mixing matrix:
every stream keeps an identity residual. At each sublayer, from the grouped-normalised streams `Hn = GroupRMS(H)`,

    G  = sigmoid(W_up SiLU(W_down vec(Hn) / n))      a per-stream, per-channel read gate in (0, 1), (n, D)
    h  = (1/n) sum_k G_k * Hn_k                      the sublayer's input (no other pre-norm)
    b  = 2 sigmoid(W_inj vec(Hn) / n)                one injection weight per stream, in (0, 2)
    H_k <- H_k + b_k F(h)                            written into the raw streams, read from the normalised ones

Before the head a last gated read without injection (Qwen4-Exp's `hyper_connection_mixer`) collapses the streams;
its grouped norm is the final norm, so the model adds none. Facts and source lines:
/work/shared/reference/residuals-2026.md section 2, from transformers 5.25
`models/qwen4_exp/modeling_qwen4_exp.py` (`Qwen4ExpTextRMSNorm` 154-176, `Qwen4ExpTextGatedResidual` 1112-1140,
the decoder layer 1378-1430, the model's tiling and mixer 1496, 1584, 1597) and `configuration_qwen4_exp.py`
(`hc_count = 4`, `hc_lowrank = 320` at `hidden_size = 2048`, `hc_count <= 1` refused, lines 105-112, 142-144, 191).
`reslab.interop.convert_gated_hc` copies a transformers `Qwen4ExpTextGatedResidual` into these modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from reslab.errors import ReslabError
from reslab.residual.base import RankReduce, ResidualSite, SiteSpec, StreamAdapter, check_integer_option
from reslab.residual.multistream import STREAM_AXIS, ParallelStreams, connection_sums, stream_metrics
from reslab.residual.stream_ops import backward_in_stream_precision, fusable_without_autocast

INIT_STD = 0.02  # Qwen4-Exp's initializer_range: the gate projections start N(0, 0.02^2) (`_init_weights`)
RMS_EPS = 1e-6  # Qwen4-Exp's rms_norm_eps
RANK_PER_WIDTH = 320 / 2048  # Qwen4-Exp's hc_lowrank over its hidden_size: the default rank scales with the width
LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_rank(width: int) -> int:
    """`gated_hc_rank` 0: Qwen4-Exp's ratio, 320 at width 2048, at least 1."""
    return max(1, round(width * RANK_PER_WIDTH))


class GroupedRMSNorm(nn.Module):
    """RMS norm of each stream on its own, gain `(1 + w)` with `w` (n D) zero at init; computed in at least fp32,
    cast back (Qwen4-Exp's `hc_norm`, `Qwen4ExpTextRMSNorm(n D, group_size=D)`). Works on (..., n, D)."""

    def __init__(self, num_streams: int, width: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(num_streams * width))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        x = streams.float() if streams.dtype in LOW_PRECISION else streams
        gain = 1.0 + self.weight.to(x.dtype).view(streams.shape[-2:])
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gain
        return out.to(streams.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class GatedRead(nn.Module):
    """The gated read of n streams (and, with `inject`, the injection weights): one Qwen4-Exp `GatedResidual`.

    Parameters by Qwen4-Exp's name: `norm.weight` = `hc_norm.weight` (n D), `mix_down` = `input_mix_weight_down`
    (r, n D), `mix_up` = `input_mix_weight_up` (n D, r), `inject` = `block_inject_weight` (n, n D) or None."""

    decayed_parameters = ("mix_down", "mix_up", "inject")  # reslab.contracts: projections, decayed like Linear weights

    def __init__(self, num_streams: int, width: int, rank: int, inject: bool):
        super().__init__()
        self.num_streams, self.width = num_streams, width
        wide = num_streams * width
        self.norm = GroupedRMSNorm(num_streams, width)
        self.mix_down = nn.Parameter(torch.randn(rank, wide) * INIT_STD)
        self.mix_up = nn.Parameter(torch.randn(wide, rank) * INIT_STD)
        self.inject = nn.Parameter(torch.randn(num_streams, wide) * INIT_STD) if inject else None

    def forward(self, by_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(h (..., D), injection weights (..., n) or None, read gate G (..., n, D)) from (..., n, D) streams."""
        n = self.num_streams
        if fusable_without_autocast(by_token, self.norm.weight, self.mix_down, self.mix_up):
            shape = by_token.shape
            h, weights, gate = FusedGatedRead.apply(by_token.reshape(-1, n, self.width), self.norm.weight,
                                                    self.mix_down, self.mix_up, self.inject, self.norm.eps)
            return (h.view(*shape[:-2], self.width), None if weights is None else weights.reshape(shape[:-1]),
                    gate.view(shape))
        normed = self.norm(by_token)
        flat = normed.flatten(-2)  # vec(Hn): a token's n D values, stream k at k D ... (k + 1) D - 1
        hidden = F.silu((flat @ self.mix_down.t()) / n)  # the /n is a fixed constant in Qwen4-Exp, not learned
        gate = torch.sigmoid(hidden @ self.mix_up.t()).unflatten(-1, (n, self.width))
        h = (gate * normed).mean(-2)
        weights = None if self.inject is None else 2 * torch.sigmoid((flat @ self.inject.t()) / n)
        return h, weights, gate

    def extra_repr(self) -> str:
        rank = self.mix_down.shape[0]
        return f"streams={self.num_streams}, rank={rank}, inject={self.inject is not None}"


class GatedStreams(ParallelStreams):
    """In: n copies of the embedding (tokens first). Out: Qwen4-Exp's `hyper_connection_mixer`, a gated read without
    injection, whose grouped norm serves as the final norm (the scheme sets `final_norm = False`)."""

    def __init__(self, num_streams: int, width: int, rank: int):
        super().__init__(num_streams, token_major=True)
        self.mixer = GatedRead(num_streams, width, rank, inject=False)

    def reduce(self, streams: torch.Tensor) -> torch.Tensor:
        return self.mixer(streams.movedim(STREAM_AXIS, -2))[0]


class GatedHyperConnections(ResidualSite):
    """Gated-residual hyper-connections (Qwen4-Exp): n streams with identity residuals, read through a low-rank
    SiLU/sigmoid gate on their grouped RMS norm, written with per-token injection weights `2 sigmoid(.)`.

        h = (1/n) sum_k G_k * GroupRMS(H)_k;   H_k = H_k + b_k F(h)

    See the module docstring for G and b. At init (gate projections N(0, 0.02^2), norm gains 1) G sits near 1/2
    and b near 1: each stream starts near pre-LN's `x + F(h)`, with h about half the RMS-normalised x. The streams,
    equal copies of the embedding, drift apart only through their own b_k (rows of W_inj). Options:
    `gated_hc_streams` n (default 4, at least 2 as in Qwen4-Exp), `gated_hc_rank` r (default 0: Qwen4-Exp's
    320/2048 of the width).
    The stream is `(n, batch, seq, width)`; a plain `(batch, seq, width)` stream (a site called outside a model)
    is widened, updated and reduced by the mean of the n streams (parameter-free: `x + mean(b) F(h)`).
    """

    name = "gated-hc"
    formula = "h = mean_k sigmoid(W_up SiLU(W_down Hn / n))_k Hn_k;  H_k = H_k + 2 sigmoid(W_inj Hn / n)_k F(h)"
    paper = "Qwen Team 2026, Qwen4-Exp gated-residual hyper-connections (transformers 5.25 qwen4_exp)"
    final_norm = False  # the stream mixer's grouped norm is the last norm before the head
    option_defaults = {"gated_hc_streams": 4, "gated_hc_rank": 0}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.num_streams = self.options["gated_hc_streams"]
        self.rank = self.options["gated_hc_rank"] or default_rank(spec.width)
        self.read = GatedRead(self.num_streams, spec.width, self.rank, inject=True)
        self.probed = False  # a probed forward ran: `scheme_metrics` reports
        self.last_sums: torch.Tensor | None = None  # `connection_sums` of a probed forward, for `scheme_metrics`

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "gated_hc_streams", 2, " (Qwen4-Exp refuses one stream)")
        check_integer_option(cls.name, options, "gated_hc_rank", 0, " (0: 320/2048 of the width)")
        return options

    streams_option = "gated_hc_streams"  # the option that counts its streams (ResidualSite.streams)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        options = cls.resolve_options(options)
        return GatedStreams(options["gated_hc_streams"], width, options["gated_hc_rank"] or default_rank(width))

    def forward(self, streams: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if streams.dim() == 3:  # one plain stream (batch, seq, width): called outside a model
            return self.on_plain_stream(streams, sublayer)
        if streams.shape[STREAM_AXIS] != self.num_streams:
            raise ReslabError(f"residual scheme 'gated-hc': got {streams.shape[STREAM_AXIS]} streams, built for "
                              f"{self.num_streams}; widen the stream with the scheme's own stream_adapter")
        by_token = streams.movedim(STREAM_AXIS, -2)  # (batch, seq, n, width): contiguous, tokens first
        h, weights, gate = self.read(by_token)
        fx = sublayer(h)
        if fusable_without_autocast(by_token, weights, fx):
            out = FusedGatedWrite.apply(by_token, weights, fx)
        else:
            out = by_token + weights.to(fx.dtype).unsqueeze(-1) * fx.unsqueeze(-2)  # H_k + b_k F(h), every stream
        out = out.to(streams.dtype).movedim(-2, STREAM_AXIS)
        if self.probe is not None:
            self.probed = True
            self.last_sums = gated_sums(gate, weights)
            # the probe measures one stream: the mean of the n (at init, all n are equal copies)
            self.observe(streams.mean(STREAM_AXIS), fx, out.mean(STREAM_AXIS))
        return out

    def on_plain_stream(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        """x -> x': widen to n copies, update, and take the mean of the n streams (no learned mixer here: the
        model's mixer lives in its stream adapter, which a lone site does not have)."""
        streams = ParallelStreams(self.num_streams, token_major=True).widen(x)
        return self(streams, sublayer).mean(STREAM_AXIS)

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, float]:
        """The Amax gain of the composite stream mix, as for hc and mhc: here every stream keeps an identity
        residual (no mixing matrix), so the composite is the identity and both gains are exactly 1; and the sums
        of H_res (the identity), H_pre and H_post (`gated_sums`)."""
        if not sites or not all(getattr(site, "probed", False) for site in sites):
            return {}
        identity = torch.eye(sites[0].num_streams, device=sites[0].read.mix_down.device)  # where the ranks reduce
        return stream_metrics([identity for _ in sites], [getattr(site, "last_sums", None) for site in sites], ranks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, streams={self.num_streams}, rank={self.rank}"


def gated_sums(gate: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`connection_sums` of one gated site, from its read gate G (..., n, D) and injection weights b (..., n):
    H_res is the identity (every stream keeps its residual); H_pre weighs stream k by G_k / n, per channel, so its
    sum is the mean of G over the streams, averaged over the channels (it reads the grouped-normalised streams, and
    no norm follows: the sum scales the sublayer's input); H_post is b."""
    n = gate.shape[-2]
    eye = torch.eye(n, dtype=weights.dtype, device=weights.device)
    return connection_sums(n, gate.detach().mean((-2, -1)), eye, weights.detach().sum(-1))


# --- fused ----------------------------------------------------------------------------------------------------
def stream_sum(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """`sum_k weights_k * streams_k` over axis 1 of two (tokens, n, D) tensors: n fused multiply-adds of one stream
    each, which CPU runs in half the time of a product of the whole width and a sum over its middle axis."""
    out = weights[:, 0] * streams[:, 0]
    for k in range(1, streams.shape[1]):
        out.addcmul_(weights[:, k], streams[:, k])
    return out


class FusedGatedRead(torch.autograd.Function):
    """`GatedRead` on (tokens, n, D) streams, forward and backward written out: `(h, b, G)` as the plain ops compute
    them, but with half the passes over the n x D width that autograd makes of them (the grouped RMS norm alone is
    six ops there, each differentiated on its own). Forward: the per-stream RMS from `vector_norm` (reads, writes
    nothing wide), `U = x rsqrt(ms + eps)`, `Hn = U (1 + w)`, one matrix product for the gate's down projection and
    the injection together, `G = sigmoid(.)` in place, `h` by `stream_sum`. Backward, with `dHn` gathered in one
    buffer: `dHn = [da; dc] [W_down; W_inj] / n + G dh / n`, `dw = sum_tokens dHn U`, and the RMS norm's
    `dx = r (dU - U <dU, U> / D)` with `dU = dHn (1 + w)`, in place. G is returned for the metrics, not
    differentiated."""

    @staticmethod
    def forward(ctx, streams, norm_weight, mix_down, mix_up, inject, eps):
        tokens, n, width = streams.shape
        rsqrt = torch.linalg.vector_norm(streams, dim=-1).square_().div_(width).add_(eps).rsqrt_()  # (tokens, n)
        unit = streams * rsqrt.unsqueeze(-1)
        gain = norm_weight.view(n, width) + 1
        normed = unit * gain
        flat = normed.view(tokens, n * width)
        projection = mix_down if inject is None else torch.cat([mix_down, inject])
        pre = (flat @ projection.t()).div_(n)  # the fixed 1/n of Qwen4-Exp
        down = pre[:, :mix_down.shape[0]]
        hidden = F.silu(down)
        gate = (hidden @ mix_up.t()).sigmoid_().view(tokens, n, width)
        h = stream_sum(gate, normed).div_(n)
        weights = None if inject is None else pre[:, mix_down.shape[0]:].sigmoid().mul_(2)
        ctx.save_for_backward(unit, normed, gate, rsqrt, gain, down, hidden, projection, mix_up, weights)
        ctx.mark_non_differentiable(gate)
        return h, weights, gate

    @staticmethod
    @once_differentiable
    @backward_in_stream_precision
    def backward(ctx, grad_h, grad_weights, _grad_gate):
        unit, normed, gate, rsqrt, gain, down, hidden, projection, mix_up, weights = ctx.saved_tensors
        tokens, n, width = unit.shape
        grad_h = (grad_h / n).unsqueeze(1)  # (tokens, 1, D)
        grad_gate = torch.ops.aten.sigmoid_backward(normed * grad_h, gate).view(tokens, n * width)
        grad_hidden = grad_gate @ mix_up
        grad_pre = torch.ops.aten.silu_backward(grad_hidden, down)
        if weights is not None:  # b = 2 sigmoid(c): db/dc = b (1 - b / 2)
            grad_pre = torch.cat([grad_pre, grad_weights * weights * (1 - weights / 2)], dim=1)
        grad_pre = grad_pre.div_(n)
        grad_projection = grad_pre.t() @ normed.view(tokens, n * width)
        grad_normed = (grad_pre @ projection).view(tokens, n, width).addcmul_(gate, grad_h)
        product = grad_normed * unit
        dot = torch.linalg.vecdot(product, gain)  # <dU, U> per token and stream, dU = dHn (1 + w)
        grad_streams = grad_normed.mul_(gain).mul_(rsqrt.unsqueeze(-1))
        grad_streams.addcmul_(unit, (rsqrt * dot).div_(-width).unsqueeze(-1))
        rank = mix_up.shape[1]
        grad_inject = None if weights is None else grad_projection[rank:]
        return (grad_streams, product.sum(0).view(-1), grad_projection[:rank], grad_gate.t() @ hidden, grad_inject,
                None)


class FusedGatedWrite(torch.autograd.Function):
    """`out = H + b (x) F(h)` on token-major (..., n, D) streams, one fused multiply-add. Backward: `dH = dout`
    (passed on as it is), `db = <dout_k, F>` per stream, `dF = sum_k b_k dout_k` (one small matrix product per
    token): nothing of the width n x D is written but the forward's output."""

    @staticmethod
    def forward(ctx, streams, weights, fx):
        ctx.save_for_backward(weights, fx)
        return torch.addcmul(streams, weights.unsqueeze(-1), fx.unsqueeze(-2))

    @staticmethod
    @once_differentiable
    @backward_in_stream_precision
    def backward(ctx, grad):
        weights, fx = ctx.saved_tensors
        n, width = grad.shape[-2:]
        grad_weights = torch.linalg.vecdot(grad, fx.unsqueeze(-2))
        grad_fx = torch.bmm(weights.reshape(-1, 1, n), grad.reshape(-1, n, width)).view(fx.shape)
        return grad, grad_weights, grad_fx
