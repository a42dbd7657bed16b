"""DenseFormer's depth-weighted average (DWA): after a block, the stream becomes a learned average of the embedding
and every earlier block's output (Pagliardini et al. 2024, arXiv 2402.02622)."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.base import check_integer_option
from reslab.residual.depth.base import Connection, DepthStream


def dwa_sources(layer: int, dilation: int) -> list[int]:
    """The indices j of the outputs X_j that the DWA after block `layer` (0-based) averages, in the reference's order:
    those with `j = layer + 1 (mod dilation)`, ascending, the current block's output X_{layer+1} last
    (epfml/DenseFormer @c99a623 denseformer/denseformer.py:35, 58-63: accumulator `(i+1) % k`, slot `j // k`)."""
    return list(range((layer + 1) % dilation, layer + 2, dilation))


def has_dwa(layer: int, period: int) -> bool:
    """Whether block `layer` (0-based) is followed by a DWA: every `period`-th block (denseformer.py:35, 62)."""
    return (layer + 1) % period == 0


class DenseFormerDWA(Connection):
    """DenseFormer: `Y_i = sum_j alpha_{i,j} X_j` after block i, the next block (or the head) reading `Y_i`.

    `X_0` is the embedding (`DepthStream.x0`), `X_{j+1}` the raw output of block j (its own pre-LN residual
    included), saved by the composed site as `blocks.j:out`; the averages read the raw outputs, never the averaged
    `Y`s (denseformer.py:57-61). With `denseformer_dilation` k, the DWA after block i averages only the `X_j` with
    `j = i+1 (mod k)`; with `denseformer_period` p, only blocks i with `(i+1) % p == 0` are followed by a DWA, the
    others pass their output on (k = p = 1: the full DenseFormer; the paper's "k x p" configurations). Each DWA
    holds one weight vector over its sources, initialised to the identity (1 on the current block's output, 0 on the
    rest: denseformer.py:39-43), so the model starts as its base scheme. The final stream is a learned weighted sum
    of the writes, not embedding + writes: `additive` stays False.
    """

    name = "denseformer"
    formula = "Y_i = sum_j alpha_{i,j} X_j  (after block i; X_0 the embedding, X_{j+1} block j's output)"
    paper = "Pagliardini et al. 2024, DenseFormer: depth weighted averaging (arXiv 2402.02622)"
    reference = "epfml/DenseFormer @c99a623 denseformer/denseformer.py:28-63 (DWAModules)"
    kind = "dense"
    option_defaults = {"denseformer_dilation": 1, "denseformer_period": 1}
    additive = False

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        active = self.block_end and has_dwa(spec.layer, options["denseformer_period"])
        self.sources = dwa_sources(spec.layer, options["denseformer_dilation"]) if active else []
        self.alpha = nn.Parameter(self.identity_weights()) if active else None

    def identity_weights(self) -> torch.Tensor:
        """All zero but the weight on the current block's output (the last source): the DWA starts as the
        identity (denseformer.py:39-43)."""
        weights = torch.zeros(len(self.sources))
        weights[-1] = 1.0
        return weights

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        for key in cls.option_defaults:
            check_integer_option(cls.name, options, key, 1)
        return options

    @classmethod
    def check_model(cls, num_layers: int, options: Mapping[str, Any]) -> None:
        """Refuse a period longer than the model (no DWA at all) and a dilation that leaves every DWA with the
        current block's output alone (the last DWA follows block `p floor(L/p) - 1` and reaches back `k` outputs)."""
        super().check_model(num_layers, options)
        period, dilation = options["denseformer_period"], options["denseformer_dilation"]
        if period > num_layers:
            raise ReslabError(f"connection 'denseformer': denseformer_period {period} is larger than the model's "
                              f"{num_layers} blocks, so no block would average; use a period in 1..{num_layers} "
                              "(or raise --layers)")
        last = period * (num_layers // period)  # the output index X_last that the last DWA ends on
        if dilation > last:
            raise ReslabError(f"connection 'denseformer': denseformer_dilation {dilation} leaves every average with "
                              f"the current block's output alone (with period {period} and {num_layers} blocks); "
                              f"use a dilation in 1..{last}")

    def init_branch(self, sublayer: nn.Module) -> None:
        """Restore the identity after the model's own init (the reference's README warns that a global init of
        every weight breaks it: call `_init_weights()` again)."""
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.copy_(self.identity_weights())

    static = True  # the weights are parameters: the final stream is a fixed combination of the writes (the lens)

    def leave(self, before: DepthStream, after: DepthStream) -> DepthStream:
        """After the block's last sublayer: the stream becomes `Y_i`; the saved raw output stays `X_{i+1}`.

        A weighted sum term by term rather than a stacked tensor: it keeps no (sources, batch, seq, width) copy
        for the backward pass (the reference shares one buffer for the same reason, denseformer.py:4-25)."""
        if self.alpha is None:
            return after
        raw = self.source(after, self.sources[-1])
        y = self.alpha[0] * self.source(after, self.sources[0])
        for weight, j in zip(self.alpha[1:], self.sources[1:]):
            y = y + weight * self.source(after, j)
        if after.x is not raw:  # an earlier connection changed the stream at this site: keep its change on top
            y = y + (after.x - raw)
        return after._replace(x=y)

    def coefficients(self) -> dict[str, Any]:
        """The DWA's weights over its sources (`dwa_sources` order): one row of the depth-weight matrix per DWA."""
        if self.alpha is None:
            return {}
        return {"alpha": self.alpha.detach().tolist(), "sources": list(self.sources)}  # sources: the X_j weighed

    def extra_repr(self) -> str:
        sources = f"; sources X_{{{','.join(map(str, self.sources))}}}" if self.sources else ""
        return f"{self.name}: {self.formula}{sources}"
