"""A transformer block: attention, then feed-forward, each meeting the stream through its residual site."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.nn.norms import NormFactory
from reslab.residual.base import ResidualSite, SiteSpec


class Block(nn.Module):
    def __init__(
        self,
        attn: nn.Module,
        ffn: nn.Module,
        scheme: type[ResidualSite],
        layer: int,
        num_layers: int,
        width: int,
        make_norm: NormFactory,
        options: Mapping[str, Any],
        vocab_size: int = 0,
    ):
        super().__init__()
        self.attn = attn
        self.ffn = ffn
        self.attn_residual = scheme(SiteSpec(layer, 0, num_layers, width, make_norm, options,
                                                       vocab_size=vocab_size))
        self.ffn_residual = scheme(SiteSpec(layer, 1, num_layers, width, make_norm, options,
                                                      vocab_size=vocab_size))

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        stream = self.attn_residual(stream, self.attn)
        stream = self.ffn_residual(stream, self.ffn)
        return stream

    def sites(self) -> list[tuple[ResidualSite, nn.Module]]:
        return [(self.attn_residual, self.attn), (self.ffn_residual, self.ffn)]
