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

SOURCE_AXIS = -2  # the earlier outputs sit next to the channels: (batch, seq, sources, width)
RMS_EPS = 1e-6


def depth_attention(sources: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_i softmax_i(query . RMSNorm(v_i)) v_i` over the sources v_i: (..., S, D) -> ((..., D), weights (..., S)).

    The keys are RMS-normalised so that a source cannot win the softmax by its size alone; no learned gain (the
    query already has one weight per channel). `query . RMSNorm(v) = (query . v) / rms(v)`: normalising the
    scores instead of the sources saves a pass over the stack (and its gradient)."""
    rms = torch.linalg.vector_norm(sources, dim=-1) / sources.shape[-1] ** 0.5
    weights = ((sources @ query) / (rms + RMS_EPS)).softmax(dim=-1)  # (..., S)
    return (weights.unsqueeze(-2) @ sources).squeeze(-2), weights


class DepthAttentionOutput(StreamAdapter):
    """In: the embedding as the first source. Out: one more depth attention, with its own pseudo-query (zero at init:
    the mean of the sources, which the final norm turns into pre-LN's output)."""

    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(SOURCE_AXIS)

    def reduce(self, sources: torch.Tensor) -> torch.Tensor:
        return depth_attention(sources, self.query)[0]


class AttentionResiduals(ResidualSite):
    """Attention residuals: each sublayer reads a learned, input-dependent mix of the earlier outputs, not their sum.

        h_l = sum_(i<l) alpha_(i->l) v_i,   alpha_(i->l) = softmax_i(w_l . RMSNorm(v_i)),   v_l = F(LN(h_l))

    The sources v_i are the embedding v_0 and the earlier sublayer outputs; `w_l` is one learned pseudo-query per
    sublayer, zero at init, so every earlier output starts with the same non-zero weight 1/l (the mean: pre-LN's
    input divided by l, which the branch's norm all but undoes). Block AttnRes (`attnres_block k`: k transformer
    blocks per AttnRes block) keeps ordinary residuals inside each block, `b = b + F`, and attends over the finished
    block sums and the open one (memory O(N d) for N blocks instead of O(L d)); k = 0 is full AttnRes. The LM head
    reads a last depth attention with its own pseudo-query.
    Kimi Team (Moonshot AI) 2026, Attention Residuals (arXiv 2603.15031).

    The stream is the stack of sources, shape (batch, seq, S, width); its last source is the open block's sum.
    """

    name = "attnres"
    formula = "h = sum_i softmax_i(w . RMSNorm(v_i)) v_i"
    paper = "Kimi Team 2026, Attention Residuals (arXiv 2603.15031)"
    option_defaults = {"attnres_block": 0}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)
        # w_l; the first sublayer has one source, the embedding, so nothing to weigh and no query
        self.query = nn.Parameter(torch.zeros(spec.width)) if spec.depth_index > 0 else None
        block_sublayers = self.options["attnres_block"] * spec.sublayers_per_block or 1  # 0: full, one per block
        self.opens_block = spec.depth_index % block_sublayers == 0  # this output starts a new source
        self.last_weights: torch.Tensor | None = None  # mean weight per source, kept from a probed forward

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "attnres_block", 0, " (0 = full AttnRes)")
        return options

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        return DepthAttentionOutput(width)

    def forward(self, sources: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if sources.dim() == 3:  # one plain stream (batch, seq, width): called outside a model
            return on_single_stream(self, sources, sublayer)
        if self.query is None:
            h, weights = sources[..., 0, :], sources.new_ones(sources.shape[:-1])
        else:
            h, weights = depth_attention(sources, self.query)
        fx = sublayer(self.norm(h))
        if self.opens_block:  # the open block is finished; F starts the next one
            out = torch.cat([sources, fx.unsqueeze(SOURCE_AXIS)], dim=SOURCE_AXIS)
        else:  # inside a block: an ordinary residual on the open block's sum
            open_block = sources[..., -1, :] + fx
            out = torch.cat([sources[..., :-1, :], open_block.unsqueeze(SOURCE_AXIS)], dim=SOURCE_AXIS)
        if self.probe is not None:
            self.last_weights = weights.detach().flatten(0, -2).mean(0)
            # the probe measures the plain residual stream (embedding + all outputs so far) that AttnRes replaces
            stream = sources.sum(SOURCE_AXIS)
            self.observe(stream, fx, stream + fx)
        return out

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, Any]:
        """Mean depth-attention weight of each source (embedding first), per sublayer, from the last probed forward
        (averaged over ranks: each holds an equal share of the batch)."""
        if not sites or any(site.last_weights is None for site in sites):
            return {}
        weights = [site.last_weights for site in sites]
        if ranks is not None:
            weights = [ranks.mean(w) for w in weights]
        return {"attnres_weights": [w.tolist() for w in weights]}

    def extra_repr(self) -> str:
        block = self.options["attnres_block"]
        return f"{super().extra_repr()}, {'block ' + str(block) if block else 'full'}"
