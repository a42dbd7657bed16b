import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import ResidualSite, SiteSpec, check_number_option


class MixLN(ResidualSite):
    """Mix-LN: post-LN `x = LN(x + F(x))` in the first floor(alpha L) blocks, pre-LN `x = x + F(LN(x))` after.

    Post-LN's large gradients in the early layers and pre-LN's in the deep ones, so every layer learns; the final
    norm before the head is kept. `mixln_alpha` (default 0.25, the paper's choice: its code, pixeli99/MixLN, runs
    `POST_NUM` 3 of 12 and 6 of 24 layers as post-LN, `layer_index < POST_NUM`) is the post-LN fraction; a site knows
    its block from `SiteSpec.layer`. Li, Yin, Liu 2024, Mix-LN (arXiv 2412.13795).
    """

    name = "mix-ln"
    formula = "x = LN(x + F(x)) in blocks < floor(alpha L), x = x + F(LN(x)) after"
    paper = "Li, Yin, Liu 2024, Mix-LN: Unleashing the Power of Deeper Layers (arXiv 2412.13795)"
    option_defaults = {"mixln_alpha": 0.25}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.post = spec.layer < math.floor(self.options["mixln_alpha"] * spec.num_layers)
        self.norm = spec.make_norm(spec.width)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_number_option(cls.name, options, "mixln_alpha", 0, 1, " (the fraction of post-LN blocks)")
        return options

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if self.post:
            fx = sublayer(x)
            out = self.norm(x + fx)
        else:
            fx = sublayer(self.norm(x))
            out = x + fx
        self.observe(x, fx, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, here {'post' if self.post else 'pre'}-LN"
