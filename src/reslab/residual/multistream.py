"""What hyper-connections (`hc`) and mHC (`mhc`) share: n parallel residual streams and one update rule.

The residual stream is widened to `n` streams `H`, indexed `(n, batch, seq, width)` (streams first; see
`stream_ops`, where static weights make each stream operation one matrix product over all tokens). At every
sublayer a site computes three connection weights and updates the streams:

    h  = read @ H                      read the sublayer's input: a weighted sum of the streams
    H' = stream_mix @ H + write (x) F(LN(h))   mix the streams, and write the sublayer's output into each

`read` (n), `stream_mix` (n x n) and `write` (n) are static parameters or computed per token; a scheme only says
how (`connection_weights`). Under the audit's tracer the mix and the write are ordinary tensor ops (`matmul` or
`einsum`, then `+`), so it sees the skip pass through a stream mix and the branch join it with an add; in training
the same update runs as fused autograd Functions (`stream_ops`).

The model calls `ParallelStreams.widen` once after the embedding (n copies) and `reduce` once before the final norm
(the sum over streams, as in the HC paper).

Diagnostics (mHC paper, arXiv 2512.24880): the *Amax gain* of the composite mix `stream_mix_L ... stream_mix_1`,
its largest absolute row sum (how much the forward signal can grow) and column sum (the backward gradient); and per
site the row and column sums of H_res (`stream_mix`), the sum of H_pre (`read`) and of H_post (`write`), averaged over
the tokens (`connection_sums`, summarised over the sites by `connection_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import (
    RankReduce,
    ResidualSite,
    SiteSpec,
    StreamAdapter,
    check_integer_option,
    on_single_stream,
)
from reslab.residual.stream_ops import (
    fused_path,
    mix_streams,
    read_and_mix,
    read_streams,
    write_into,
    write_streams,
)

STREAM_AXIS = 0  # streams first: (n, batch, seq, width)


class ParallelStreams(StreamAdapter):
    """n copies of the embedding in; their sum out. The streams are indexed (n, batch, seq, width) either way; in
    memory they lie streams first for static weights (each stream operation one matrix product over all tokens), or
    tokens first (`token_major`) for per-token weights (one small matrix per token, contiguous, and a token's
    n x width values side by side for mHC's projection of vec(x))."""

    def __init__(self, num_streams: int, token_major: bool = False):
        super().__init__()
        self.num_streams = num_streams
        self.token_major = token_major

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        # a real copy, not a stride-0 view: matmuls on stride-0 operands fall off BLAS's fast path
        if self.token_major:
            return x.unsqueeze(-2).expand(*x.shape[:-1], self.num_streams, x.shape[-1]).contiguous().movedim(-2, 0)
        return x.unsqueeze(STREAM_AXIS).expand(self.num_streams, *x.shape).contiguous()

    def reduce(self, streams: torch.Tensor) -> torch.Tensor:
        if self.token_major:
            return streams.sum(STREAM_AXIS)
        return read_streams(streams.new_ones(self.num_streams), streams)  # the sum over streams, as a matmul

    def extra_repr(self) -> str:
        return f"streams={self.num_streams}"


class MultiStreamSite(ResidualSite):
    """Base of the multi-stream schemes: the update rule, the probe's view and the Amax gain diagnostic."""

    option_defaults = {"streams": 4}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.num_streams = self.options["streams"]
        self.norm = spec.make_norm(spec.width)  # the sublayer's own pre-norm, applied to what it reads
        self.last_stream_mix: torch.Tensor | None = None  # kept from a probed forward for `scheme_metrics`
        self.last_sums: torch.Tensor | None = None  # `connection_sums` of a probed forward, for `scheme_metrics`

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "streams", 1)
        return options

    streams_option = "streams"  # the option that counts its streams (ResidualSite.streams)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        options = cls.resolve_options(options)
        return ParallelStreams(options["streams"], token_major=cls.per_token_weights(options))

    @classmethod
    def per_token_weights(cls, options: Mapping[str, Any]) -> bool:
        """Are the connection weights computed per token (then the streams lie tokens first in memory)?"""
        return True

    def connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(read (n,), stream_mix (n, n), write (n,)) static, or per token with leading (batch, seq) axes."""
        raise NotImplementedError

    def forward(self, streams: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if streams.dim() == 3:  # one plain stream (batch, seq, width): called outside a model
            return on_single_stream(self, streams, sublayer)
        read, stream_mix, write = self.connection_weights(streams)
        if fused_path(streams):  # in the stream's precision, also under autocast
            h, mixed = read_and_mix(read, stream_mix, streams)
            fx = sublayer(self.norm(h))
            out = write_into(mixed, write, fx)
        else:  # the same update in plain ops, for the audit's tracer, torch.compile and torch.func
            h = read_streams(read, streams)  # the sublayer's input: a weighted sum of the streams
            fx = sublayer(self.norm(h))
            out = mix_streams(stream_mix, streams) + write_streams(write, fx)
        if self.probe is not None:
            self.last_stream_mix = stream_mix.detach()
            self.last_sums = connection_sums(self.num_streams, read.sum(-1), stream_mix, write.sum(-1))
            # the probe measures one stream: the mean of the n (at HC's init, exactly pre-LN's stream)
            self.observe(streams.mean(STREAM_AXIS), fx, out.mean(STREAM_AXIS))
        return out

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, float]:
        """Amax gain of the composite stream mix of the last probed forward (max over tokens, and over ranks), and
        the sums of H_res, H_pre and H_post (`connection_metrics`)."""
        return stream_metrics([getattr(site, "last_stream_mix", None) for site in sites],
                              [getattr(site, "last_sums", None) for site in sites], ranks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, streams={self.num_streams}"


@torch.no_grad()
def composite_mix(stream_mixes: list[torch.Tensor]) -> torch.Tensor:
    """`stream_mix_L @ ... @ stream_mix_1`: how the streams entering the first site reach the last site's output
    along the skip paths alone. Static (n, n) and per-token (batch, seq, n, n) matrices broadcast together."""
    composite = stream_mixes[0].double()
    for mix in stream_mixes[1:]:
        composite = mix.double() @ composite
    return composite


def amax_gain(stream_mixes: list[torch.Tensor]) -> tuple[float, float]:
    """(largest absolute row sum, largest absolute column sum) of the composite mix, maximised over tokens.

    The row sum bounds how much the forward signal can grow through the skips, the column sum the gradient
    (mHC paper, arXiv 2512.24880: HC reaches about 3000 at 27B, mHC stays at or below about 1.6)."""
    composite = composite_mix(stream_mixes).abs()
    return composite.sum(-1).amax().item(), composite.sum(-2).amax().item()


def stream_metrics(mixes: list[torch.Tensor | None], sums: list[torch.Tensor | None],
                   ranks: RankReduce | None = None) -> dict[str, float]:
    """A multi-stream scheme's `scheme_metrics`: the Amax gain of the composite of `mixes` (max over tokens and
    ranks) when every one is there, and `connection_metrics` of `sums` (one per site) when every one is there.
    Whether each is there is the same on every rank (all probed the same forward), so the ranks reduce in step."""
    found: dict[str, float] = {}
    if mixes and all(mix is not None for mix in mixes):
        gains = torch.tensor(amax_gain(mixes), device=mixes[0].device)
        forward, backward = (ranks.max(gains) if ranks is not None else gains).tolist()
        found.update(amax_gain_forward=forward, amax_gain_backward=backward)
    if sums and all(entry is not None for entry in sums):
        found.update(connection_metrics(sums, ranks))
    return found


@torch.no_grad()
def connection_sums(streams: int, read_sum: torch.Tensor | None = None, stream_mix: torch.Tensor | None = None,
                    write_sum: torch.Tensor | None = None) -> torch.Tensor:
    """One site's connection-weight sums, each averaged over the tokens, in float64 (2 + 2n,):
    [sum of H_pre, sum of H_post, the n row sums of H_res, its n column sums]; NaN for a weight the site lacks.

    `read_sum` and `write_sum` are the per-token sums of the read (H_pre) and write (H_post) weights, with any
    leading token axes (none for static weights); `stream_mix` is H_res, (..., n, n), the matrix that multiplies
    the streams, so row i weighs what enters output stream i (the forward gain) and column j where input stream j
    goes (the backward gain), as in the mHC paper's plots of its learned mappings (arXiv 2512.24880)."""
    given = [value for value in (read_sum, stream_mix, write_sum) if value is not None]
    sums = torch.full((2 + 2 * streams,), math.nan, dtype=torch.float64, device=given[0].device)  # ranks reduce it
    for index, value in ((0, read_sum), (1, write_sum)):
        if value is not None:
            sums[index] = value.double().mean()
    if stream_mix is not None:
        mix = stream_mix.double().reshape(-1, streams, streams).mean(0)  # the token-mean: the sums are linear
        sums[2:] = torch.cat([mix.sum(-1), mix.sum(-2)])
    return sums


def connection_metrics(sums: list[torch.Tensor], ranks: RankReduce | None = None) -> dict[str, float]:
    """The sites' `connection_sums` (averaged over ranks first: each holds an equal share of the batch) summarised
    over the sites: the largest |row sum - 1| and |column sum - 1| of H_res, its mean row sum (the mean column sum
    too: both are the sum of its entries over n), and the mean sums of H_pre and H_post. A weight no site has
    (NaN throughout) is left out."""
    table = torch.stack(sums)
    if ranks is not None:
        table = ranks.mean(table)
    streams = (table.shape[1] - 2) // 2
    pre, post, rows, cols = table[:, 0], table[:, 1], table[:, 2:2 + streams], table[:, 2 + streams:]
    values = torch.stack([_largest((rows - 1).abs()), _largest((cols - 1).abs()), rows.nanmean(), pre.nanmean(),
                          post.nanmean()]).tolist()
    names = ("h_res_row_sum_dev", "h_res_col_sum_dev", "h_res_sum_mean", "h_pre_sum_mean", "h_post_sum_mean")
    return {name: value for name, value in zip(names, values) if not math.isnan(value)}


def _largest(values: torch.Tensor) -> torch.Tensor:
    """The largest value that is not NaN (a 0-dim tensor); NaN when there is none."""
    largest = values.nan_to_num(nan=-math.inf).max()
    return torch.where(largest == -math.inf, math.nan, largest)
