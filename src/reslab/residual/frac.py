"""Frac-connections (`frac`): hyper-connections over fractions of the width instead of copies of the stream.

Zhu et al. 2025, Frac-Connections: Fractional Extension of Hyper-Connections (arXiv 2503.14125). Where HC widens
the stream to `n` copies (expansion rate n), Frac-connections split it into `m` fractions of width `D/m`
(expansion rate 1/m) and apply HC's width and depth connections over the fractions. In general there are `n`
streams of `m` fractions each, `n m` "fraction streams" `H[s, a]` (stream s, fraction a) of width `d = D/m`:

    h[g]      = sum_{a,s} alpha[a, s, g, 0]    H[s, a]                          the sublayer's input, fraction g
    H'[s', g] = sum_{a,s} alpha[a, s, g, 1+s'] H[s, a] + sum_a beta[a, s', g] y[a],   y = F(LN(h)) in fractions

with `alpha = A + s_a act(Hn[s, a] W_a)` and `beta = B + s_b act(Hn[s, a] W_b)` per token in the dynamic variant
(`frac_dynamic`, the default): `Hn = RMS(H[s, a]) (1 + gamma)` per fraction, W_a (d, m (1+n)), W_b (d, m), both 0
at init, s_a = s_b = 0.01, act = tanh (`frac_tanh`). This is how lucidrains/hyper-connections 0.4.11 computes
`HyperConnections(n, dim=D, num_fracs=m)` (hyper_connections/hyper_connections.py: fraction split 201-206, norm
86-93 and 210, static alpha 229-232, dynamic alpha 234-235, beta 242-247, mix 290-315, write 350-363), whose
README example is `get_init_and_expand_reduce_stream_functions(1, num_fracs = 4)`: hence the defaults n = 1, m = 4.
Multiple streams enter as n copies of the embedding and are summed before the final norm (package lines 59-61).

Layout. Our coefficients index the package's exactly as it *computes* with them: its static alpha
(n m, m + n m) has rows (fraction, stream) (line 293) and columns re-split as (fraction g, slot 0..n) (line 297),
so `alpha` here is that matrix viewed as (m, n, m, 1+n), and `reslab.interop.convert_frac.load_frac_site` copies
it as it is. The package's static beta (n m) is (stream, fraction g) (line 311) broadcast over the branch fraction
a; ours is (a, s, g), a superset (the converter broadcasts).

Init (a deliberate difference). The package concatenates `[alpha0 | I]` as if the columns were (slot, fraction),
so for m > 1 its initial branch input is a scramble of fractions of the stream, and its beta of ones writes the
sum of all fractions of F into every fraction (residuals-2026.md section 6 "Frac-connections", the pitfall).
Here the init is the identity per fraction, the one HC prescribes (Zhu et al. 2024, arXiv 2409.19606):
A[a, s, g, 0] = [a = g][s = k mod n] for the sublayer at depth k, A[a, s, g, 1+s'] = [a = g][s = s'],
B[a, s, g] = [a = g]; so h is the stream, every stream holds pre-LN's stream, and with n = 1 the model is exactly
pre-LN at init. Weights copied from the package reproduce the package's computation, whatever their values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.base import (
    RankReduce,
    ResidualSite,
    SiteSpec,
    StreamAdapter,
    check_bool_option,
    check_integer_option,
    on_single_stream,
)
from reslab.residual.depth.base import ComposedSite
from reslab.residual.mhc import normalized_projection, normalized_projection_backward
from reslab.residual.multistream import ParallelStreams, connection_sums, stream_metrics
from reslab.residual.stream_ops import backward_in_stream_precision, fused_path

NORM_EPS = 1e-12  # F.normalize's floor on the L2 norm, as the package's RMSNorm (hyper_connections.py:93)
DYNAMIC_SCALE_INIT = 0.01  # s_a and s_b (hyper_connections.py:235, 247)


class FracConnections(ResidualSite):
    """Frac-connections over `frac_streams` streams of `frac_fractions` fractions (see the module docstring).

    The stream is (batch, seq, width) for one stream and (n, batch, seq, width) for n > 1 (`ParallelStreams`)."""

    name = "frac"
    formula = "H = split(h, m); h = A_m^T H;  H = A_r^T H + B^T split(F(LN(h)))"
    paper = "Zhu et al. 2025, Frac-Connections: Fractional Extension of Hyper-Connections (arXiv 2503.14125)"
    option_defaults = {"frac_streams": 1, "frac_fractions": 4, "frac_dynamic": True, "frac_tanh": True}
    decayed_parameters = ("dynamic_alpha", "dynamic_beta")  # reslab.contracts: projections of the stream

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.num_streams, self.num_fracs = n, m = self.options["frac_streams"], self.options["frac_fractions"]
        self.fraction_width = check_width(spec.width, m)
        if n > 1 and isinstance(self, ComposedSite):  # `compose` could check the default options (one stream) only
            raise ReslabError(f"residual {self.name!r}: connections across depth compose with one stream only; set "
                              "frac_streams=1 or drop the connections")
        self.dynamic, self.tanh = self.options["frac_dynamic"], self.options["frac_tanh"]
        self.norm = spec.make_norm(spec.width)  # the sublayer's own pre-norm, applied to what it reads
        # coefficients, not weight matrices: reslab's AdamW leaves them undecayed (not in `decayed_parameters`)
        self.alpha = nn.Parameter(identity_alpha(m, n, spec.depth_index % n))  # (m, n, m, 1+n): a, s, g, slot
        self.beta = nn.Parameter(torch.eye(m).unsqueeze(1).repeat(1, n, 1))  # (m, n, m): a, s, g
        self.dynamic_alpha: nn.Parameter | None = None
        self.dynamic_beta: nn.Parameter | None = None
        if self.dynamic:
            d = self.fraction_width
            self.dynamic_gain = nn.Parameter(torch.zeros(d))  # gamma of the (1 + gamma) norm scale
            self.dynamic_alpha = nn.Parameter(torch.zeros(d, m, 1 + n))
            self.dynamic_beta = nn.Parameter(torch.zeros(d, m))
            self.dynamic_scale = nn.Parameter(torch.full((2,), DYNAMIC_SCALE_INIT))  # s_a, s_b
        self.last_stream_mix: torch.Tensor | None = None  # kept from a probed forward for `scheme_metrics`
        self.last_sums: torch.Tensor | None = None  # `connection_sums` of a probed forward, for `scheme_metrics`

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "frac_streams", 1)
        check_integer_option(cls.name, options, "frac_fractions", 2,
                             " (one fraction is hyper-connections: use --residual hc)")
        for key in ("frac_dynamic", "frac_tanh"):
            check_bool_option(cls.name, options, key)
        return options

    streams_option = "frac_streams"  # the option that counts its streams (ResidualSite.streams)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        options = cls.resolve_options(options)
        check_width(width, options["frac_fractions"])
        if options["frac_streams"] == 1:
            return StreamAdapter()  # one stream: the plain (batch, seq, width) stream, split in place at each site
        return ParallelStreams(options["frac_streams"], token_major=options["frac_dynamic"])

    def forward(self, stream: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        n = self.num_streams
        if n > 1 and stream.dim() == 3:  # one plain stream (batch, seq, width): called outside a model
            return on_single_stream(self, stream, sublayer)
        streams = stream.unsqueeze(0) if n == 1 else stream  # (n, batch, seq, width)
        if self.dynamic and fused_path(streams):
            out, fx, alpha, beta = self.fused_update(streams, sublayer)
        else:
            out, fx, alpha, beta = self.plain_update(streams, sublayer)
        if self.probe is not None:
            self.last_stream_mix = stream_mix(alpha.detach())
            self.last_sums = fraction_sums(alpha.detach(), beta.detach(), self.last_stream_mix)
            # the probe measures one stream: the mean of the n (at init, exactly pre-LN's stream)
            self.observe(streams.mean(0), fx, out.mean(0))
        return out.squeeze(0) if n == 1 else out

    def plain_update(self, streams: torch.Tensor, sublayer: nn.Module):
        """(new streams, F's output, alpha, beta) in plain ops, as the module docstring writes them: the static
        variant, and wherever the fused Functions step aside (`fused_path`: the audit's tracer, compile, torch.func)."""
        m = self.num_fracs
        fracs = streams.unflatten(-1, (m, self.fraction_width))  # (n, batch, seq, m, d): H[s, a]
        with stream_precision(streams):
            alpha, beta = self.connection_weights(fracs)
            mixed = torch.einsum("...asgu,s...ad->u...gd", alpha, fracs)  # slot 0: the input; 1..n: the streams
        fx = sublayer(self.norm(mixed[0].flatten(-2)))  # under the model's autocast, if any
        with stream_precision(streams):
            y = fx.to(streams.dtype).unflatten(-1, (m, self.fraction_width))
            out = (mixed[1:] + torch.einsum("...asg,...ad->s...gd", beta, y)).flatten(-2)
        return out, fx, alpha, beta

    def fused_update(self, streams: torch.Tensor, sublayer: nn.Module):
        """`plain_update` for the dynamic variant as batched matmuls over tokens: a token's n m fraction streams
        are the rows of one (n m, d) matrix (a view of token-major streams), its weights one (n m, (1+n) m) matrix
        for the read and the mix and one (n m, m) matrix for the write; `FracRead` computes the weights, the read
        and the mix in one Function, the write is one `baddbmm`."""
        n, m, d = self.num_streams, self.num_fracs, self.fraction_width
        lead = streams.shape[1:-1]
        rows = streams.movedim(0, -2).reshape(-1, n * m, d)  # (tokens, n m, d): H[s, a] in row s m + a
        with stream_precision(streams):
            proj = torch.cat([self.dynamic_alpha.transpose(1, 2).flatten(1), self.dynamic_beta], dim=1)
            proj = proj * (1 + self.dynamic_gain).unsqueeze(-1)  # the norm's gain (1 + gamma), folded into W
            static_alpha = self.alpha.permute(1, 0, 3, 2).reshape(n * m, (1 + n) * m)  # [s m + a, u m + g]
            static_beta = self.beta.permute(1, 2, 0).reshape(n * m, m)  # [s m + g, a]
            h, mixed, write = FracRead.apply(rows, proj, static_alpha, static_beta, self.dynamic_scale,
                                             (n, m, self.tanh))
        fx = sublayer(self.norm(h.reshape(*lead, m * d)))  # under the model's autocast, if any
        with stream_precision(streams):
            out = torch.baddbmm(mixed, write, fx.to(streams.dtype).reshape(-1, m, d))  # (tokens, n m, d)
        out = out.view(*lead, n, m * d).movedim(-2, 0)  # token-major streams (n, batch, seq, D)
        if self.probe is None:
            return out, fx, None, None
        with torch.no_grad():  # the probe's copy of the weights, in the plain layout
            alpha, beta = self.connection_weights(streams.unflatten(-1, (m, d)))
        return out, fx, alpha, beta

    def connection_weights(self, fracs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta): static (m, n, m, 1+n) and (m, n, m), or per token with leading (batch, seq) axes, from
        the fraction streams `fracs` (n, batch, seq, m, d)."""
        if not self.dynamic:
            return self.alpha, self.beta
        normed = fracs / fracs.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        normed = normed * (self.fraction_width ** 0.5) * (1 + self.dynamic_gain)
        act = torch.tanh if self.tanh else (lambda t: t)
        by_token = normed.movedim(0, -2)  # (batch, seq, m, n, d): a token's (fraction a, stream s) rows
        dynamic_alpha = act(by_token @ self.dynamic_alpha.flatten(1)).unflatten(-1, self.dynamic_alpha.shape[1:])
        dynamic_beta = act(by_token @ self.dynamic_beta)
        return (self.alpha + self.dynamic_scale[0] * dynamic_alpha,
                self.beta + self.dynamic_scale[1] * dynamic_beta)

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, float]:
        """Amax gain (mHC paper, arXiv 2512.24880) of the composite stream mix over the n m fraction streams of the
        last probed forward (max over tokens, and over ranks): 1 at init, where every mix is the identity; and the
        sums of H_res, H_pre and H_post (`fraction_sums`)."""
        return stream_metrics([getattr(site, "last_stream_mix", None) for site in sites],
                              [getattr(site, "last_sums", None) for site in sites], ranks)

    def extra_repr(self) -> str:
        kind = ("dynamic" if self.dynamic else "static") + (", tanh" if self.dynamic and self.tanh else "")
        return f"{super().extra_repr()}, streams={self.num_streams}, fractions={self.num_fracs}, {kind}"


def fast_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) as 2 sigmoid(2x) - 1, the same function (to about one unit of the last place in absolute terms):
    torch's CPU sigmoid is several times faster than its tanh, and the dynamic weights are (tokens, n m, (2+n) m)."""
    return torch.sigmoid(2 * x).mul_(2).sub_(1)


def beta_layout(values: torch.Tensor, streams: int, fractions: int) -> torch.Tensor:
    """(tokens, n m, m) [t, s m + i, j] -> [t, s m + j, i]: between the projection's beta (rows (s, a), columns g)
    and the write's (rows (s, g), columns a); its own inverse."""
    return values.view(-1, streams, fractions, fractions).transpose(-1, -2).reshape(values.shape)


class FracRead(torch.autograd.Function):
    """Frac-connections' dynamic weights, read and mix for (tokens, n m, d) fraction rows H, in one Function:

        P = H_flat W / (rms(H_flat) + eps)          one projection of each fraction row onto alpha's and beta's columns
        weights = A + s_a act(P_alpha)              (tokens, n m, (1+n) m), `FracConnections.fused_update`'s layout
        write = B + s_b beta_layout(act(P_beta))    (tokens, n m, m)
        [h; mixed] = weights^T H                    one batched matmul over tokens; h: (tokens, m, d)

    act is tanh or the identity. The backward is the chain rule through the same steps (the normalised projection's
    as `reslab.residual.mhc.NormalizedProjection`), with the gradients of H from the mix, the read and the projection
    summed in place in one buffer, and no concatenated gradient of [h; mixed]."""

    @staticmethod
    def forward(ctx, rows, proj, static_alpha, static_beta, scales, shape):
        n, m, tanh = shape
        tokens, count, d = rows.shape
        flat, reads = rows.view(-1, d), static_alpha.shape[-1]
        projected, rms = normalized_projection(flat, proj, NORM_EPS / d ** 0.5)
        act = (fast_tanh(projected) if tanh else projected).view(tokens, count, -1)
        weights = torch.addcmul(static_alpha, act[..., :reads], scales[0])
        write = torch.addcmul(static_beta, beta_layout(act[..., reads:], n, m), scales[1])
        out = torch.bmm(weights.transpose(1, 2), rows)  # (tokens, (1+n) m, d)
        ctx.save_for_backward(rows, proj, rms, projected, act, weights, scales)
        ctx.shape, ctx.eps = shape, NORM_EPS / d ** 0.5
        return out[:, :m], out[:, m:], write

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_h, grad_mixed, grad_write):
        rows, proj, rms, projected, act, weights, scales = ctx.saved_tensors
        (n, m, tanh), reads = ctx.shape, weights.shape[-1]
        grad_out = torch.cat([grad_h, grad_mixed], dim=1)  # one copy: then 2 batched matmuls where there were 4
        grad_weights = torch.bmm(rows, grad_out.transpose(1, 2))
        grad_rows = torch.bmm(weights, grad_out)
        # d(s act)/d(s, act) for both blocks at once: [dweights | dwrite in the projection's layout] (tokens, n m, C)
        grad_scaled = torch.cat([grad_weights, beta_layout(grad_write, n, m)], dim=-1)
        product = grad_scaled * act
        grad_scales = torch.stack([product[..., :reads].sum(), product[..., reads:].sum()])
        grad_act = grad_scaled.mul_(torch.cat([scales[:1].expand(reads), scales[1:].expand(m)])).view(projected.shape)
        if tanh:  # tanh' = 1 - act^2
            flat_act = act.view(projected.shape)
            grad_act.addcmul_(grad_act * flat_act, flat_act, value=-1)
        d = rows.shape[-1]
        _, grad_proj = normalized_projection_backward(grad_act, rows.view(-1, d), proj, rms, projected, ctx.eps,
                                                      into=grad_rows.view(-1, d))
        return grad_rows, grad_proj, grad_weights.sum(0), grad_write.sum(0), grad_scales, None


def stream_precision(streams: torch.Tensor):
    """Autocast off for the stream update, which runs in the stream's precision: the stream stays fp32 under bf16
    autocast, as pre-LN's residual add does (a bf16 einsum would round the whole stream at every site). The meta
    device has no autocast to turn off."""
    if streams.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(streams.device.type, enabled=False)


def check_width(width: int, fractions: int) -> int:
    """The fraction width D/m; a one-line error when m does not divide the width (package line 204)."""
    if width % fractions:
        divisors = ", ".join([str(k) for k in range(2, width + 1) if width % k == 0][:3])
        raise ReslabError(f"residual scheme 'frac': frac_fractions={fractions} must divide the width {width}; "
                          f"choose a divisor of it ({divisors}, ...)")
    return width // fractions


def identity_alpha(fractions: int, streams: int, read_stream: int) -> torch.Tensor:
    """The static alpha at init, (m, n, m, 1+n): slot 0 (the sublayer's input) reads fraction g of stream
    `read_stream`, slot 1+s' keeps fraction g of stream s' (the identity per fraction; HC's A_m = e_k, A_r = I)."""
    alpha = torch.zeros(fractions, streams, fractions, 1 + streams)
    for g in range(fractions):
        alpha[g, read_stream, g, 0] = 1.0
        for s in range(streams):
            alpha[g, s, g, 1 + s] = 1.0
    return alpha


def stream_mix(alpha: torch.Tensor) -> torch.Tensor:
    """The skip path's matrix over the fraction streams: M[(s', g), (s, a)] = alpha[a, s, g, 1+s'], (n m, n m),
    static or per token with leading axes; consecutive sites' matrices compose by matrix product."""
    lead = alpha.dim() - 4
    mix = alpha[..., 1:].permute(*range(lead), lead + 3, lead + 2, lead + 1, lead)  # (..., s', g, s, a)
    return mix.flatten(-4, -3).flatten(-2, -1)


def fraction_sums(alpha: torch.Tensor, beta: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """`connection_sums` over the n m fraction streams: H_res is `stream_mix(alpha)`; H_pre reads each fraction g
    of the sublayer's input from the fraction streams (alpha[a, s, g, 0]), its sum taken per g and averaged over
    the m fractions; H_post writes each fraction a of the output into the fraction streams (beta[a, s', g]), its
    sum taken per a and averaged over the m. At init both read sums are 1 and each write sum is n, as in HC."""
    read_sum = alpha[..., 0].sum((-3, -2)).mean(-1)  # (..., a, s, g) -> per g -> mean over g
    write_sum = beta.sum((-2, -1)).mean(-1)  # (..., a, s', g) -> per a -> mean over a
    return connection_sums(mix.shape[-1], read_sum, mix, write_sum)
