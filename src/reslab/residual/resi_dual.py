"""ResiDual (Xie et al. 2023, arXiv 2304.14802): Pre-Post-LN, a post-LN stream and a pre-LN-style dual stream.

Every sublayer reads the post-LN stream `x` and its output `F(x)` goes two ways: into `x` the post-LN way, and,
scaled by `s`, into a second stream `d` that only accumulates (the pre-LN identity path, never normalised):

    x <- LN(x + F(x)),   d <- d + s F(x)        per sublayer; both start from the embedding, d_0 = s x_0
    y  = a x_L + LN_d(d_L)                      once, before the LM head

Facts from the reference code, microsoft/ResiDual @8682f75 (a fairseq fork):
- `resi_dual/resi_dual_layers.py:37-39, 50-51` (encoder) and `:135-136, 176-177` (decoder): `res = res + x *
  scale` then `x = layer_norm(x + xr)`, with the same dropped-out sublayer output `x` in both;
- `resi_dual/resi_dual.py:107, 252`: `res = x * scale` (the dual stream starts at s times the embedding);
- `resi_dual/resi_dual.py:131, 283`: `x = x * alpha + self.layer_norm(res)`, and that is what the output projection
  reads: no other final norm (the decoder's own `layer_norm` is this one, `LayerNorm(dim, eps=1e-7)`, line 157);
- `resi_dual/resi_dual.py:296-300`: `enc_alpha`/`dec_alpha` (a) and `*_res_input_norm_scale` (s) default to 1.
x-transformers' `resi_dual` (lucidrains @66ab2c7, lines 2246, 2368-2369, 2404-2405) is the same rule with a = 1 and
s in (0, 1], meant to keep the un-normalised dual stream from overflowing in fp16 (line 1850); LN_d(s d) = LN_d(d)
up to eps, so s changes nothing else.

In reslab the stream between sites is a `DualStream(x, d)`; the scheme's stream adapter (`DualOutput`) starts it
from the embedding and, before the head, returns `a x + LN_d(d)`. It owns `LN_d`, so the model adds no final norm
(`final_norm = False`): the post-LN stream is already normalised, and a second norm over the sum is not the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.nn.norms import LayerNorm
from reslab.residual.base import NormFactory, RankReduce, ResidualSite, SiteSpec, StreamAdapter, check_number_option

DUAL_NORM_EPS = 1e-7  # the reference's output norm of the dual stream (resi_dual/resi_dual.py:24, 157)


class DualStream(NamedTuple):
    """ResiDual's two streams: `x`, post-LN (what the sublayers read), and `d`, the raw sum of their writes."""

    x: torch.Tensor
    d: torch.Tensor


class DualOutput(StreamAdapter):
    """In: both streams from the embedding, `DualStream(x_0, s x_0)`. Out: `a x_L + LN_d(d_L)`, the only norm
    between the last sublayer and the head (its weights are this module's: `norm`)."""

    def __init__(self, width: int, alpha: float, scale: float, make_norm: NormFactory | None = None):
        super().__init__()
        self.alpha, self.scale = float(alpha), float(scale)
        # the reference's LayerNorm(eps=1e-7); a model's own kind of norm when the model hands its factory over
        self.norm = make_norm(width) if make_norm is not None else LayerNorm(width, eps=DUAL_NORM_EPS)

    def widen(self, x: torch.Tensor) -> DualStream:
        return DualStream(x, x * self.scale if self.scale != 1 else x)

    def reduce(self, stream: DualStream) -> torch.Tensor:
        x, d = stream
        return (x * self.alpha if self.alpha != 1 else x) + self.norm(d)

    def extra_repr(self) -> str:
        return f"y = {self.alpha:g} x + LN(d)"


class ResiDual(ResidualSite):
    """ResiDual: `x = LN(x + F(x))` and `d = d + s F(x)` at every sublayer; `y = a x + LN(d)` before the head.

    The post-LN stream keeps the representation normalised (no collapse of the later layers' contribution), the
    dual stream gives every sublayer an identity path to the output (no vanishing gradient of the early layers).
    Options: `resi_dual_alpha` (a, weight of the post-LN stream in the output, default 1) and `resi_dual_scale`
    (s in (0, 1], default 1: only keeps the un-normalised dual stream small in low precision).
    The probe sees the post-LN stream, the one the sublayers read; `scheme_metrics` reports the dual stream's RMS.
    """

    name = "resi-dual"
    formula = "x = LN(x + F(x)), d = d + s F(x); y = a x + LN(d)"
    paper = "Xie et al. 2023, ResiDual: Transformer with Dual Residual Connections (arXiv 2304.14802)"
    final_norm = False  # the adapter's LN(d) is the output norm; x is post-LN already
    option_defaults = {"resi_dual_alpha": 1.0, "resi_dual_scale": 1.0}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)  # the post-LN norm of x + F(x)
        self.scale = float(self.options["resi_dual_scale"])
        self.last_dual_square: torch.Tensor | None = None  # mean square of d after the block, from a probed forward

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_number_option(cls.name, options, "resi_dual_alpha", 0, math.inf, " (the post-LN stream's weight)")
        scale = options["resi_dual_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise ReslabError(f"residual scheme {cls.name!r}: resi_dual_scale must be a number in (0, 1] (the dual "
                              f"stream's scale s), got {scale!r}")
        return options

    @classmethod
    def streams(cls, options: Mapping[str, Any]) -> int:
        return 2

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any], *,
                       make_norm: NormFactory | None = None) -> StreamAdapter:
        options = cls.resolve_options(options)
        return DualOutput(width, options["resi_dual_alpha"], options["resi_dual_scale"], make_norm)

    def forward(self, stream: DualStream | torch.Tensor, sublayer: nn.Module) -> DualStream | torch.Tensor:
        if isinstance(stream, torch.Tensor):  # one plain stream (batch, seq, width): called outside a model
            return self.on_plain_stream(stream, sublayer)
        x, d = stream
        fx = sublayer(x)  # the sublayer reads the post-LN stream, with no norm of its own
        out = self.norm(x + fx)
        d = d + (fx * self.scale if self.scale != 1 else fx)
        if self.probe is not None:
            if self.spec.index == self.spec.sublayers_per_block - 1:
                self.last_dual_square = d.detach().float().pow(2).mean()
            self.observe(x, fx, out)
        return DualStream(out, d)

    def on_plain_stream(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        """`x -> a LN(x + F(x)) + LN_d(s x + s F(x))`: a one-site ResiDual network, its output norm freshly made
        (unit gain, zero bias) on `x`'s device and dtype (as `on_single_stream`, which would make it in float32)."""
        adapter = type(self).stream_adapter(self.spec.width, self.spec.num_layers, self.options)
        adapter = adapter.to(device=x.device, dtype=x.dtype) if x.is_floating_point() else adapter
        return adapter.reduce(self(adapter.widen(x), sublayer))

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, Any]:
        """RMS of the un-normalised dual stream after each block (what `resi_dual_scale` keeps in range), from the
        last probed forward; the mean square is averaged over ranks (each holds an equal share of the batch)."""
        ends = [site for site in sites if site.spec.index == site.spec.sublayers_per_block - 1]
        if not ends or any(site.last_dual_square is None for site in ends):
            return {}
        squares = torch.stack([site.last_dual_square for site in ends])
        if ranks is not None:
            squares = ranks.mean(squares)
        return {"dual_stream_rms": squares.sqrt().tolist()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.options['resi_dual_alpha']:g}, s={self.scale:g}"
