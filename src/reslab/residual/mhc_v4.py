"""`mhc-v4`: manifold-constrained hyper-connections as DeepSeek-V4 ships them (transformers 5.25, `deepseek_v4`).

The formulas are restated from /work/shared/reference/residuals-2026.md section 1, which cites
`tf-5.25:models/deepseek_v4/modeling_deepseek_v4.py` (HyperConnection lines 884-995, HyperHead 998-1014, decoder
wiring 1148-1199, init 1280-1287); the code is reslab's own. `reslab.interop.convert_mhc_v4` loads the weights of
transformers' modules into these sites and into the head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.residual.base import ResidualSite, SiteSpec, StreamAdapter, check_integer_option
from reslab.residual.multistream import STREAM_AXIS, MultiStreamSite, ParallelStreams
from reslab.residual.sinkhorn_ops import rsqrt_projection, unrolled_sinkhorn
from reslab.residual.stream_ops import fused_path, read_streams

INIT_STD = 0.02  # initializer_range: fn and hc_fn ~ N(0, 0.02^2) (tf-5.25 modeling_deepseek_v4.py:1280-1287)
HC_EPS = 1e-6  # hc_eps (configuration_deepseek_v4.py:146-148)
RMS_EPS = 1e-6  # rms_norm_eps of the unweighted RMS of vec(H) (configuration_deepseek_v4.py:165-166)


def weight_precision(streams: torch.Tensor):
    """Autocast off while the connection weights are computed: V4 keeps `attn_hc`, `ffn_hc` and `hc_head` in fp32
    (`_keep_in_fp32_modules_strict`, lines 1240-1252). The meta device has no autocast to turn off."""
    if streams.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(streams.device.type, enabled=False)


def weight_dtype(streams: torch.Tensor) -> torch.dtype:
    """The precision of the connection weights: fp32, as V4 computes them (`.float()`), or fp64 for fp64 streams
    (where V4 would still round to fp32; reslab keeps fp64 runs exact, e.g. for gradient checks)."""
    return torch.promote_types(streams.dtype, torch.float32)


def flat_rms(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMS(vec(H))` per token in `weight_dtype`, with no learned gain: (n, batch, seq, D) -> (batch, seq, n D), the
    features stream-major (stream j's D values, then stream j+1's), as V4 flattens its (batch, seq, n, D) streams.
    V4's form: `x * rsqrt(mean(x^2) + eps)`, eps inside the root (`DeepseekV4UnweightedRMSNorm`, lines 65-71)."""
    flat = streams.movedim(STREAM_AXIS, -2).flatten(-2).to(weight_dtype(streams))  # a view when tokens lie first
    return flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def v4_sinkhorn(logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """V4's projection of (..., n, n) logits `Z` (index [j, k]: input stream j, output stream k) towards the
    doubly-stochastic matrices: `softmax_k(Z) + eps`, then divide by column sums (+ eps), then `iterations - 1`
    times rows then columns, eps in every denominator (lines 981, 987-990). The last step is a column
    normalisation, so every output stream k gets weights `sum_j C[j, k] = 1` (up to eps). Differentiated by
    autograd through every step, as transformers does."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def token_rows(streams: torch.Tensor) -> torch.Tensor:
    """vec(H) per token in `weight_dtype`, (tokens, n D), stream-major as `flat_rms` lays it out: a view of
    token-major fp32 streams (no copy, no dtype round trip)."""
    flat = streams.movedim(STREAM_AXIS, -2).flatten(-2)
    return flat.reshape(-1, flat.shape[-1]).to(weight_dtype(streams))


def by_token(channels: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """(C, tokens) channel-major weights as (batch, seq, C) for `streams`' tokens, token-major in memory (a small
    copy: the batched matmuls of `stream_ops` want each token's weights contiguous)."""
    return channels.t().contiguous().view(*streams.shape[1:-1], channels.shape[0])


class DeepSeekV4HyperHead(ParallelStreams):
    """The stream adapter of `mhc-v4`: n copies of the embedding in (V4 line 1356: identical copies, no stream
    embedding), and out, before the final norm, V4's `HyperHead` collapse with learned per-token weights:

        w = sigmoid(hc_scale (hc_fn RMS(vec H)) + hc_base) + hc_eps        out = sum_j w_j H_j

    `hc_fn` (n, n D) ~ N(0, 0.02^2), `hc_base` (n,) = 0, `hc_scale` (1,) = 1 (lines 998-1014, 1284-1287); w in
    fp32 (fp64 for fp64 streams). A module of the model (`model.stream`): its parameters train with the rest."""

    decayed_parameters = ("hc_fn",)  # reslab.contracts: a projection of the streams, decayed like mhc's

    def __init__(self, num_streams: int, width: int):
        super().__init__(num_streams, token_major=True)
        self.hc_fn = nn.Parameter(torch.randn(num_streams, num_streams * width) * INIT_STD)
        self.hc_base = nn.Parameter(torch.zeros(num_streams))
        self.hc_scale = nn.Parameter(torch.ones(1))
        self.hc_eps, self.rms_eps = HC_EPS, RMS_EPS

    def collapse_weights(self, streams: torch.Tensor) -> torch.Tensor:
        """The head's per-token weights w (batch, seq, n), in `weight_dtype`."""
        dtype = weight_dtype(streams)
        if fused_path(streams):  # the RMS and the projection in one Function, channel-major
            with weight_precision(streams):
                mixes = rsqrt_projection(token_rows(streams), self.hc_fn.to(dtype), self.rms_eps)
                weights = torch.sigmoid(mixes * self.hc_scale.to(dtype) + self.hc_base.to(dtype).unsqueeze(-1))
            return by_token(weights + self.hc_eps, streams)
        with weight_precision(streams):
            mixes = F.linear(flat_rms(streams, self.rms_eps), self.hc_fn.to(dtype))
            return torch.sigmoid(mixes * self.hc_scale.to(dtype) + self.hc_base.to(dtype)) + self.hc_eps

    def reduce(self, streams: torch.Tensor) -> torch.Tensor:
        return read_streams(self.collapse_weights(streams).to(streams.dtype), streams)


class DeepSeekV4MHC(MultiStreamSite):
    """DeepSeek-V4's mHC, as transformers 5.25 ships it (`DeepseekV4HyperConnection`, `DeepseekV4HyperHead`).

    One site per sublayer (V4's `attn_hc` / `ffn_hc`). From the streams H (n x D per token), in fp32:

        x' = RMS(vec H)  (no gain)      [z_pre | z_post | z_comb] = fn x'      fn: ((2+n) n, n D), one fused matrix
        pre  = sigmoid(scale_0 z_pre + b_pre) + hc_eps          (n,)  not normalised to sum 1
        post = 2 sigmoid(scale_1 z_post + b_post)               (n,)
        comb = Sinkhorn(scale_2 mat(z_comb) + B_comb)           (n, n), `v4_sinkhorn`
        H' = comb^T H + post (x) F(LN(sum_j pre_j H_j))         stream k: post_k F + sum_j comb[j, k] H_j

    `base` = [b_pre | b_post | B_comb] ((2+n) n,) = 0 and `scale` (3,) = 1 at init, fn ~ N(0, 0.02^2); LN is the
    sublayer's own pre-norm, applied to the collapsed read. The model's stream adapter is `DeepSeekV4HyperHead`.
    Here `read` = pre, `stream_mix` = comb^T, `write` = post.

    How this differs from reslab's `mhc` (`reslab.residual.mhc`, the 2025 paper's form, arXiv 2512.24880 section 4):
    - RMS of vec(H): `x rsqrt(mean(x^2) + eps)` (eps inside the root) here; `x / (rms(x) + eps)` in `mhc`.
    - Parameters: `fn` ((2+n) n, n D), applied as `fn x'`, with one bias vector `base` and `scale` (3,); `mhc` has
      `dynamic_proj` (n D, 2n + n^2), applied as `x' dynamic_proj`, and `gates`, `read_bias`, `write_bias`,
      `mix_bias`. Both split [pre | post | comb] in that order.
    - Init: `scale` = 1 and `base` = 0 here, so the weights start random: pre ~ 0.5 + eps each, post ~ 1, comb
      near uniform at small widths (the logits' std is about 0.02 sqrt(n D), 2.6 at V4's size), and the model is
      not pre-LN at init; `mhc` starts near HC's init: gates 0.01, b_pre = e_(k mod n), b_post = 0, B_res = I.
    - pre: `sigmoid(.) + hc_eps` here; `sigmoid(.)` in `mhc`. post: `2 sigmoid(.)` in both.
    - The stream mix, in reslab's orientation (M = `stream_mix` multiplies H; V4's comb is M^T, V4 mixes
      `comb^T H`): here M0 = softmax over each *column* of the logits, + eps, then rows, then (iterations - 1) x
      (columns, rows), eps in every denominator, differentiated by autograd through every step; the last step
      leaves M's *rows* summing to 1 (each output stream a convex combination: forward Amax gain 1, up to eps).
      `mhc`: M0 = exp(logits) (log space when they spread wide), then iterations x (rows, columns) without eps,
      an implicit fixed-point gradient; the last step leaves M's *columns* summing to 1.
    - The final collapse: the learned, per-token `DeepSeekV4HyperHead` here; `mhc` sums the streams.
    - Precision: the weights are computed in fp32 from an fp32 copy of the streams, autocast off, as V4's fp32
      modules do (fp64 streams: in fp64, where V4 would round to fp32), then cast to the stream's dtype; `mhc`
      computes them in the stream's precision.
    - Options: `mhc_v4_streams` (V4's hc_mult, 4) and `mhc_v4_sinkhorn_iters` (hc_sinkhorn_iters, 20); `mhc`'s
      are `streams` and `sinkhorn_iters`.
    Called alone on a plain (batch, seq, width) stream, a site widens it to n copies and sums them back (a site
    owns no head; `HC`'s reduction), so it stays deterministic.
    """

    name = "mhc-v4"
    formula = "x = comb^T x + post^T F(LN(pre x)), [pre|post|comb] = f(fn RMS(vec x)); HyperHead collapse"
    paper = "DeepSeek-V4's mHC, transformers 5.25 deepseek_v4 (mHC: DeepSeek-AI, arXiv 2512.24880)"
    option_defaults = {"mhc_v4_streams": 4, "mhc_v4_sinkhorn_iters": 20}

    decayed_parameters = ("fn",)  # reslab.contracts: a projection of the streams, decayed like mhc's

    def __init__(self, spec: SiteSpec):
        ResidualSite.__init__(self, spec)  # MultiStreamSite's own init reads the shared `streams` option
        n = self.num_streams = self.options["mhc_v4_streams"]
        self.norm = spec.make_norm(spec.width)  # the sublayer's pre-norm, on the collapsed read
        self.last_stream_mix: torch.Tensor | None = None
        self.last_sums: torch.Tensor | None = None  # MultiStreamSite's probe fills both
        self.sinkhorn_iters = self.options["mhc_v4_sinkhorn_iters"]
        self.hc_eps, self.rms_eps = HC_EPS, RMS_EPS
        self.fn = nn.Parameter(torch.randn((2 + n) * n, n * spec.width) * INIT_STD)
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super(MultiStreamSite, cls).resolve_options(given)
        check_integer_option(cls.name, options, "mhc_v4_streams", 1)
        check_integer_option(cls.name, options, "mhc_v4_sinkhorn_iters", 1)
        return options

    streams_option = "mhc_v4_streams"  # the option that counts its streams (ResidualSite.streams)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        return DeepSeekV4HyperHead(cls.streams(options), width)

    def connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre, comb^T, post) per token, computed in `weight_dtype` (fp32 or fp64), cast to the streams' dtype."""
        if fused_path(streams):
            return self.fused_connection_weights(streams)
        n, dtype = self.num_streams, weight_dtype(streams)
        with weight_precision(streams):
            z_pre, z_post, z_comb = F.linear(flat_rms(streams, self.rms_eps), self.fn.to(dtype)).split(
                [n, n, n * n], dim=-1)
            b_pre, b_post, b_comb = self.base.to(dtype).split([n, n, n * n])
            s_pre, s_post, s_comb = self.scale.to(dtype).unbind(0)
            pre = torch.sigmoid(z_pre * s_pre + b_pre) + self.hc_eps
            post = 2 * torch.sigmoid(z_post * s_post + b_post)
            comb = v4_sinkhorn(z_comb.unflatten(-1, (n, n)) * s_comb + b_comb.view(n, n), self.sinkhorn_iters,
                               self.hc_eps)
        return pre.to(streams.dtype), comb.transpose(-1, -2).to(streams.dtype), post.to(streams.dtype)

    def fused_connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`connection_weights` through `sinkhorn_ops`' Functions, channel-major (tokens last): the same math and
        the same gradient (the Sinkhorn's unrolled), in far fewer and wider kernels. The results are views."""
        n, dtype = self.num_streams, weight_dtype(streams)
        with weight_precision(streams):
            z = rsqrt_projection(token_rows(streams), self.fn.to(dtype), self.rms_eps)  # ((2+n) n, tokens)
            base, scale = self.base.to(dtype).unsqueeze(-1), self.scale.to(dtype)
            gates = torch.sigmoid(z[:2 * n] * scale[:2].repeat_interleave(n).unsqueeze(-1) + base[:2 * n])
            pre, post = gates[:n] + self.hc_eps, 2 * gates[n:]
            logits = (z[2 * n:] * scale[2] + base[2 * n:]).view(n, n, -1)  # (j, k, tokens)
            comb = unrolled_sinkhorn(logits, self.sinkhorn_iters, self.hc_eps)
        stream_mix = comb.permute(2, 1, 0).reshape(*streams.shape[1:-1], n, n).to(streams.dtype)  # comb^T by token
        return by_token(pre, streams).to(streams.dtype), stream_mix, by_token(post, streams).to(streams.dtype)

    def forward(self, streams: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if streams.dim() == 3:  # one plain stream, outside a model: n copies in, their sum out
            adapter = ParallelStreams(self.num_streams, token_major=True)
            return adapter.reduce(super().forward(adapter.widen(streams), sublayer))
        return super().forward(streams, sublayer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}"
